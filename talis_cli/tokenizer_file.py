"""A ``tokenizer.json`` folder read with the ``tokenizers`` library alone (no transformers import: about a second
of start-up on a small CPU).

`TokenizerFile` offers what talis uses of a transformers tokenizer (encode, decode, token/id lookups, the special
tokens, the chat template) with the same results as transformers 5's ``TokenizersBackend`` (the class that
``AutoTokenizer`` picks for ``tokenizer_class`` "PreTrainedTokenizerFast" / "TokenizersBackend"), which uses the
``tokenizer.json`` pipeline as it is. `read_tokenizer_file` returns None for the folders whose loading transformers
changes in ways not repeated here (model-specific tokenizer classes, which rebuild the pipeline from the vocabulary;
legacy added_tokens.json; clean-up of decoded spaces; model-specific named tokens): those go through transformers.

Files read, as transformers reads them: tokenizer.json; tokenizer_config.json (named special tokens, extra special
tokens, added_tokens_decoder, split_special_tokens, chat_template); special_tokens_map.json only when the config has
no added_tokens_decoder (transformers' legacy rule); chat_template.jinja and additional_chat_templates/*.jinja, which
win over the config's template.
"""

from __future__ import annotations

import json
from pathlib import Path

LIGHT_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")  # transformers keeps their tokenizer.json as is
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_DIR = "additional_chat_templates"


def read_tokenizer_file(folder: Path):
    """The folder's tokenizer as a `TokenizerFile`, or None when transformers must load it (see the module notes).

    Raises what `tokenizers` and `json` raise for unreadable files (the caller words the error).
    """
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    if not (folder / "tokenizer.json").is_file() or not isinstance(config, dict):
        return None
    if config.get("tokenizer_class") not in LIGHT_CLASSES or not _plain_config(config):
        return None
    legacy = "added_tokens_decoder" not in config
    if legacy and (folder / "added_tokens.json").is_file():
        return None
    settings = dict(config, extra_special_tokens=config.get("extra_special_tokens")
                    or config.get("additional_special_tokens") or [])
    if legacy and (folder / "special_tokens_map.json").is_file():  # transformers reads it only then
        extra = _read_json(folder / "special_tokens_map.json")
        if not isinstance(extra, dict) or set(extra) - {*NAMED_TOKENS, "extra_special_tokens"}:
            return None
        special = lambda value: {**value, "special": True} if isinstance(value, dict) else value  # noqa: E731
        settings.update({key: special(value) for key, value in extra.items() if key in NAMED_TOKENS})
        known = {_content(token) for token in settings["extra_special_tokens"]}
        settings["extra_special_tokens"] += [special(token) for token in extra.get("extra_special_tokens") or []
                                             if _content(token) not in known]  # merged, as transformers merges
    from tokenizers import Tokenizer

    return TokenizerFile(Tokenizer.from_file(str(folder / "tokenizer.json")), settings, _chat_template(folder, config))


def _plain_config(config: dict) -> bool:
    """Whether the config holds nothing that transformers would apply beyond what TokenizerFile repeats."""
    if config.get("clean_up_tokenization_spaces") or "fast_tokenizer_files" in config or "auto_map" in config:
        return False
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if extras is not None and not isinstance(extras, list):
        return False  # a dict of named model-specific tokens
    return not any(key.endswith("_token") and key not in NAMED_TOKENS and isinstance(value, (str, dict))
                   for key, value in config.items())


def _content(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else str(token)


def _read_json(path: Path):
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _chat_template(folder: Path, config: dict):
    """The chat template as transformers sets it: a string, a {name: template} dict, or None."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / TEMPLATE_DIR).is_dir():
        for path in (folder / TEMPLATE_DIR).glob("*.jinja"):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _added_token(value):
    """A config value as transformers holds it: a string, or an AddedToken for a serialized one."""
    if isinstance(value, dict):
        from tokenizers import AddedToken

        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**fields)
    return value


class TokenizerFile:
    """What talis uses of a transformers tokenizer, over a `tokenizers.Tokenizer` (same ids and text).

    backend: the Tokenizer read from tokenizer.json (changed in place as transformers changes it: missing special
    tokens added, split_special_tokens applied); settings: tokenizer_config.json's keys (with special_tokens_map.json's
    where transformers reads it; "extra_special_tokens" the list of extra special tokens); chat_template: a Jinja source, a {name: source} dict, or None.
    """

    def __init__(self, backend, settings: dict, chat_template=None):
        from tokenizers import AddedToken

        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.model_max_length = settings.get("model_max_length") or 1 << 30
        backend.encode_special_tokens = bool(settings.get("split_special_tokens", False))
        self._named = {key: _added_token(settings[key]) for key in NAMED_TOKENS if settings.get(key) is not None}
        if backend.padding and "pad_token" not in self._named:  # transformers takes tokenizer.json's padding token
            self._named["pad_token"] = backend.padding["pad_token"]
        self._extra = [_added_token(token) for token in settings.get("extra_special_tokens") or []]
        # transformers re-adds the config's added tokens, then any special token missing from the vocabulary
        config_added = [_added_token(token) for _, token in
                        sorted((settings.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0]))]
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        present |= {str(token) for token in config_added}
        named = {str(token) for token in self._named.values()}
        missing = []
        for token in [*self._named.values(), *self._extra]:
            if str(token) not in present and token not in missing:
                missing.append(token)
        to_add = config_added + missing
        if to_add:
            tokens = []
            for token in to_add:
                if isinstance(token, str):
                    token = AddedToken(token, special=True)
                elif not token.special and str(token) in named:
                    token.special = True
                tokens.append(token)
            backend.add_tokens(tokens)

    # ----- special tokens

    def _token(self, key: str) -> str | None:
        value = self._named.get(key)
        return None if value is None else str(value)

    bos_token = property(lambda self: self._token("bos_token"))
    eos_token = property(lambda self: self._token("eos_token"))
    unk_token = property(lambda self: self._token("unk_token"))
    pad_token = property(lambda self: self._token("pad_token"))
    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def special_tokens_map(self) -> dict:
        """{"bos_token": "<s>", ...}: the named special tokens that are set, in transformers' order."""
        return {key: str(self._named[key]) for key in NAMED_TOKENS if self._named.get(key) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, without repeats."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *(str(t) for t in self._extra)]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(token) for token in self.all_special_tokens]

    @property
    def added_tokens_decoder(self) -> dict:
        """{id: tokenizers.AddedToken} of the added tokens (content, special, lstrip, rstrip, ...)."""
        return self.backend_tokenizer.get_added_tokens_decoder()

    # ----- vocabulary

    def __len__(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """The id of a token string (the unknown token's id, or None, when absent), or a list of them."""
        if isinstance(tokens, str):
            index = self.backend_tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None and tokens != self.unk_token else index
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids):
        """The token string of an id (None outside the vocabulary), or a list of them."""
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    # ----- text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; control-token text becomes control tokens (unless split_special_tokens is set).
        `add_special_tokens` runs tokenizer.json's post-processor (transformers leaves it as saved)."""
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of `ids` (an int or a sequence). `skip_special_tokens` drops added tokens marked special;
        spaces are never cleaned up (folders that ask for it load through transformers)."""
        if isinstance(ids, int):
            ids = [ids]
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
