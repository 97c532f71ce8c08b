"""Tokenizers as model folders ship them, and prompt encoding that keeps user text plain.

Accepted forms (see the notes on formats): ``tokenizer.json`` (+ ``tokenizer_config.json``), or a SentencePiece
``tokenizer.model`` with a ``tokenizer_config.json`` naming ``LlamaTokenizer`` (LLaMA-1/2 folders, read with the
``sentencepiece`` and ``protobuf`` packages). The SentencePiece form becomes a fast tokenizer whose ids equal the
SentencePiece model's own: its normalizer spec (dummy prefix, extra-whitespace removal, character map) is applied
as SentencePiece applies it.

Control tokens (BOS, EOS, chat markers: the tokenizer's special added tokens) come only from talis and from chat
templates. User text - a prompt, a chat message, a system prompt - is encoded as plain text, so the literal text
``</s>`` is five characters, not EOS (``PromptEncoder``).
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from functools import cached_property
from pathlib import Path
from typing import Callable

from .errors import TalisError, UsageError
from .tokenizer_file import read_tokenizer_file

ACCEPTED_FORMS = "tokenizer.json, or tokenizer.model (SentencePiece) with tokenizer_config.json"
LLAMA_CLASS_NAMES = ("LlamaTokenizer", "LlamaTokenizerFast", "LLaMATokenizer")  # the last: 2023 conversions
SPACE_MARK = "\u2581"  # SentencePiece's visible space
PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: stands in for control-token text of user strings


def tokenizer_form(folder: Path) -> str | None:
    """Which accepted tokenizer file `folder` holds ("tokenizer.json" first), or None."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(folder) / name).is_file():
            return name
    return None


@contextmanager
def quiet_transformers():
    """Keep transformers' log lines, Python warnings and stray prints off the terminal for the block's duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with its BOS, as transformers' encode with special tokens does
    (tokenizer.json's post-processor; for a converted SentencePiece model, add_bos_token). True when the tokenizer
    has no BOS token: the model's own (config.json) is then used."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return True
    with_special = tokenizer.encode("a", add_special_tokens=True)
    added = len(with_special) - len(tokenizer.encode("a", add_special_tokens=False))
    return bos in with_special[:max(added, 0)]


def load_tokenizer(folder: Path | str, light: bool = True):
    """The tokenizer in `folder`: a `TokenizerFile` (the `tokenizers` library alone) where that gives transformers'
    results, else a transformers tokenizer backed by a fast `tokenizers.Tokenizer`; `light` False always takes
    transformers' (the reference the light one is tested against).

    Loading prints nothing. Raises UsageError when the folder holds none of the accepted files (suggesting
    --tokenizer), TalisError when a file is there but cannot be read (naming the packages a SentencePiece
    model needs when they are missing).
    """
    folder = Path(folder)
    form = tokenizer_form(folder)
    if form is None:
        raise UsageError(f"{folder} has no tokenizer files (accepted: {ACCEPTED_FORMS}); pass --tokenizer DIR "
                         "with the original model's folder")
    proto = read_sentencepiece(folder / form) if form == "tokenizer.model" else None
    try:
        tokenizer = read_tokenizer_file(folder) if light and proto is None else None
        if tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
            with quiet_transformers():
                tokenizer = _from_pretrained(folder, proto is not None)
                if proto is not None:
                    match_sentencepiece(tokenizer, proto)
    except Exception as e:
        reason = f"{e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        raise TalisError(f"{folder}: cannot load the tokenizer ({reason}); accepted: {ACCEPTED_FORMS}") from None
    tokenizer.model_max_length = 1 << 30  # talis checks lengths against the context itself
    backend = tokenizer.backend_tokenizer  # tokenizer.json may switch these on; talis encodes whole texts, unpadded
    backend.no_truncation()
    backend.no_padding()
    return tokenizer


def _from_pretrained(folder: Path, sentencepiece_only: bool):
    """AutoTokenizer, except that a SentencePiece-only folder naming a LLaMA class (or none) gets LlamaTokenizer."""
    from transformers import AutoTokenizer

    options = dict(local_files_only=True, trust_remote_code=False)
    if sentencepiece_only and _config_class(folder) in (*LLAMA_CLASS_NAMES, None):
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(folder), **options)
    return AutoTokenizer.from_pretrained(str(folder), **options)


def _config_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def read_sentencepiece(path: Path):
    """The SentencePiece ModelProto in `path`; TalisError when the packages are missing or the file is not one."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise TalisError(f"{path} is a SentencePiece model: reading it needs the sentencepiece and protobuf "
                         "packages (pip install sentencepiece protobuf)") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        proto = None
    if proto is None or not proto.pieces:
        raise TalisError(f"{path} is not a SentencePiece model; accepted: {ACCEPTED_FORMS}")
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise TalisError(f"{path} is a SentencePiece {kind} model; talis reads SentencePiece BPE models (LLaMA's); "
                         "a tokenizer.json is needed for this one")
    return proto


def match_sentencepiece(tokenizer, proto) -> None:
    """Make the fast tokenizer converted from `proto` normalize text as SentencePiece does (in place).

    SentencePiece applies its character map, removes extra whitespace if asked, adds the dummy prefix (one space
    before the text, always) and writes spaces as U+2581. transformers' conversion adds the prefix only when the
    text does not start with a space and ignores the rest; with those steps as normalizers, ids equal
    `SentencePieceProcessor.encode`.
    """
    from tokenizers import Regex, decoders, normalizers

    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE_MARK))
    steps.append(normalizers.Replace(" ", SPACE_MARK))
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    undo = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(undo + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))


def padding_id(tokenizer, rows: int) -> int:
    """A token id for padding slots that the embedding (`rows` rows) holds: the pad token's when it fits, else
    EOS, else 0 (padded slots are masked, so any valid id serves)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int) and 0 <= candidate < rows:
            return candidate
    return 0


LONG_TEXT = 1 << 16  # characters: a text this long takes tens of milliseconds and more to encode


def check_in_embedding(ids, rows: int, tokenizer) -> None:
    """TalisError naming the first id of `ids` that the embedding (`rows` rows) does not hold, with both sizes."""
    bad = next((i for i in ids if not 0 <= i < rows), None)
    if bad is not None:
        text = tokenizer.decode([bad]).strip() or tokenizer.convert_ids_to_tokens(bad)
        raise TalisError(f"the prompt holds token {text!r} (id {bad}), which the model's embedding of {rows} rows "
                         f"does not have (the tokenizer has {len(tokenizer)} tokens); remove that text from the prompt")


class PromptEncoder:
    """Turns text into token ids for a model: user text as plain text, a template's markup as control tokens.

    tokenizer: what `load_tokenizer` returns (a TokenizerFile, or a transformers tokenizer with a fast backend).
    Ids are lists of ints; no BOS is added here (the engine adds the model's).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.control = {token.content: token for token in tokenizer.added_tokens_decoder.values() if token.special}
        self.control_ids = {content: tokenizer.convert_tokens_to_ids(content) for content in self.control}
        by_length = sorted(self.control, key=len, reverse=True)  # the longest control token wins where two start
        self._control_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None

    @cached_property
    def _inner(self):
        """The backend for pieces inside a longer text: the tokenizer's own, or, where it adds a SentencePiece dummy
        prefix at the start of the text only (Metaspace "first"), a copy that adds none there. Only the
        pre-tokenizer's JSON is read to decide: copying a 128k-token tokenizer takes most of a second."""
        from tokenizers import Tokenizer

        backend = self.tokenizer.backend_tokenizer
        pre_tokenizer = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else None
        if not _never_prepend(pre_tokenizer):
            return backend
        state = json.loads(backend.to_str())
        state["pre_tokenizer"] = pre_tokenizer
        return Tokenizer.from_str(json.dumps(state))

    def plain(self, text: str, at_start: bool = True) -> list[int]:
        """Ids of `text` as plain text: control-token text is ordinary characters. `at_start` False encodes a
        piece from inside a longer text (no SentencePiece dummy prefix where the tokenizer adds it first only)."""
        if not text:
            return []
        backend = self.tokenizer.backend_tokenizer if at_start else self._inner
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True  # special tokens' text goes through the model like any text
        try:
            if len(text) >= LONG_TEXT:  # same ids; encode_batch lets other threads run meanwhile (encode holds the GIL)
                return backend.encode_batch([text], add_special_tokens=False)[0].ids
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = saved

    def parse_special(self, text: str) -> list[int]:
        """Ids of `text` with control-token text parsed into control tokens (a raw prompt under --special)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, render: Callable[[list], str], messages: list) -> list[int]:
        """Ids of the conversation `messages` as `render` (messages -> text) writes it, where only the renderer's
        own markup yields control tokens.

        Control-token text inside the messages is swapped for private-use placeholders before rendering; the
        rendered text is then cut at the control tokens left (the template's), each piece between them gets its
        placeholders back and is encoded as plain text. For messages free of control-token text the ids equal
        encoding the whole rendered text with the tokenizer.
        """
        strings = [m.get("content") for m in messages if isinstance(m.get("content"), str)]
        swap, restore = self._placeholders(strings)
        if swap:
            pattern = re.compile("|".join(map(re.escape, sorted(swap, key=len, reverse=True))))
            messages = [{**m, "content": pattern.sub(lambda hit: swap[hit.group(0)], m["content"])}
                        if isinstance(m.get("content"), str) else m for m in messages]
        return self.encode_rendered(render(messages), restore)

    def encode_rendered(self, text: str, restore: dict | None = None) -> list[int]:
        """Ids of rendered template text: its control-token text becomes control tokens, the rest plain text with
        the placeholders of `restore` (placeholder -> original text) put back."""
        pieces = self._control_re.split(text) if self._control_re else [text]  # text, control, text, ...
        for i in range(1, len(pieces), 2):  # tokens that swallow whitespace beside them, as the tokenizer does
            token = self.control[pieces[i]]
            if token.lstrip:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if token.rstrip:
                pieces[i + 1] = pieces[i + 1].lstrip()
        table = str.maketrans(restore) if restore else None
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.control_ids[piece])
            elif piece:
                ids += self.plain(piece.translate(table) if table else piece, at_start=i == 0)
        return ids

    def _placeholders(self, strings: list) -> tuple[dict, dict]:
        """({control text: placeholder}, {placeholder: control text}) for the control texts found in `strings`;
        placeholders are private-use characters that occur in none of them."""
        if self._control_re is None:
            return {}, {}
        found = sorted({hit for s in strings for hit in self._control_re.findall(s)})
        used = set("".join(strings))
        swap, code = {}, PLACEHOLDER_BASE
        for content in found:
            while chr(code) in used:
                code += 1
            swap[content] = chr(code)
            code += 1
        return swap, {v: k for k, v in swap.items()}


def _never_prepend(pre_tokenizer: dict | None) -> bool:
    """Set every Metaspace with prepend_scheme "first" in this pre-tokenizer JSON to "never"; whether any was."""
    if not isinstance(pre_tokenizer, dict):
        return False
    changed = False
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        pre_tokenizer["prepend_scheme"] = "never"
        changed = True
    for inner in pre_tokenizer.get("pretokenizers") or ():
        changed = _never_prepend(inner) or changed
    return changed
