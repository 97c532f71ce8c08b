"""A tokenizer.json folder read without transformers (issue 14, part 3) gives what transformers gives: the same ids
(plain and with control tokens), decoded text, special tokens and ids, vocabulary, added tokens and rendered chats,
on every tokenizer form the tests build; the forms transformers must convert still load through it."""

import json
import random

import pytest

from talis_cli.chat_templates import BUILTIN_TEMPLATES, resolve_template, special_token_strings
from talis_cli.detokenize import special_ids_to_skip
from talis_cli.engine import DEFAULT_MODEL_DIR, eos_ids
from talis_cli.tokenizer import PromptEncoder, load_tokenizer
from talis_cli.tokenizer_file import TokenizerFile
from tests.test_chat_templates import JINJA_FORMATS, random_conversation
from tests.tiny_models import TOKENIZER_DIR
from tests.tokenizer_fixtures import (CHAT_TOKENS, train_sentencepiece, write_byte_level_folder,
                                      write_sentencepiece_folder)

TEXTS = ["In the beginning God created the heaven and the earth.", " leading space", "  two leading spaces",
         "two  spaces and trailing  ", "line\n\n  indented\tand tabbed\r\n", "digits 1611 and 42",
         "</s> and <s> are text here", "<|im_start|>user\nhi<|im_end|> <|eot_id|>x<|begin_of_text|>",
         "<unk><pad> <0x41> <|end|>  \n<|sep|>y", "emoji 🙂🕊️👨‍👩‍👧, é ü ß", "日本語のテキストと中文", "\u2581 a visible-space mark",
         "\x00\x1b control characters \u200b", "", " "]


def _chat_folder(root, source):
    """The byte-level tokenizer with Llama-3 markers as named tokens, extra special tokens that swallow spaces, a
    pad token beyond the trained vocabulary and a chat template: all saved by transformers."""
    from tokenizers import AddedToken

    folder = write_byte_level_folder(root / "source")
    tokenizer = load_tokenizer(folder, light=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": [
        AddedToken("<|end|>", lstrip=True, rstrip=True, special=True), AddedToken("<|sep|>", rstrip=True, special=True)]})
    tokenizer.add_tokens(["Mahershalalhashbaz"])
    tokenizer.chat_template = source
    tokenizer.save_pretrained(str(root / "chat"))
    return root / "chat"


def _config_template_folder(root):
    """The embedded tokenizer with a chat template inside tokenizer_config.json, as 2024 folders have it."""
    folder = root / "config_template"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config.update(chat_template=JINJA_FORMATS[sorted(JINJA_FORMATS)[0]], split_special_tokens=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _split_special_folder(root):
    """A config asking for control-token text to be split like any text (split_special_tokens)."""
    folder = root / "split"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((TOKENIZER_DIR / "tokenizer.json").read_bytes())
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    return folder


def _legacy_folder(root):
    """A config without added_tokens_decoder (so transformers reads special_tokens_map.json too) naming a pad token
    and an extra special token the vocabulary lacks (transformers adds them), and a tokenizer.json that pads."""
    folder = root / "legacy"
    folder.mkdir()
    state = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    state["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": 2,
                        "pad_type_id": 0, "pad_token": "</s>"}
    (folder / "tokenizer.json").write_text(json.dumps(state))
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<|x|>", "</s>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"unk_token": {"content": "<unk>", "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False}, "mask_token": {"content": "<mask>", "lstrip": True,
                                                                   "rstrip": False, "normalized": False,
                                                                   "single_word": False},
               "extra_special_tokens": [{"content": "<|y|>", "lstrip": False, "rstrip": True, "normalized": False,
                                         "single_word": False}]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("light")
    llama3 = next(source for name, source in JINJA_FORMATS.items() if "start_header_id" in source)
    return {"embedded": DEFAULT_MODEL_DIR, "kjv": TOKENIZER_DIR,
            "byte_level": write_byte_level_folder(root / "byte_level"),
            "chat": _chat_folder(root, llama3),
            "config_template": _config_template_folder(root),
            "split_special": _split_special_folder(root), "legacy": _legacy_folder(root)}


def added_tokens(tokenizer) -> dict:
    return {i: (t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word)
            for i, t in tokenizer.added_tokens_decoder.items()}


@pytest.mark.parametrize("name", ["embedded", "kjv", "byte_level", "chat", "config_template", "split_special",
                                  "legacy"])
def test_light_tokenizer_equals_transformers(folders, name):
    light, reference = load_tokenizer(folders[name]), load_tokenizer(folders[name], light=False)
    assert isinstance(light, TokenizerFile) and not isinstance(reference, TokenizerFile)
    assert len(light) == len(reference) and light.get_vocab() == reference.get_vocab()
    assert added_tokens(light) == added_tokens(reference)
    for attribute in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id",
                      "unk_token_id", "pad_token_id", "special_tokens_map", "all_special_tokens", "all_special_ids",
                      "chat_template"):
        assert getattr(light, attribute) == getattr(reference, attribute), attribute
    assert special_token_strings(light) == special_token_strings(reference)
    assert special_ids_to_skip(light) == special_ids_to_skip(reference)
    every_id = list(range(len(reference) + 2))  # two beyond the vocabulary
    assert light.convert_ids_to_tokens(every_id) == reference.convert_ids_to_tokens(every_id)
    tokens = [*CHAT_TOKENS, "<s>", "</s>", "<unk>", "<pad>", "not a token", "Mahershalalhashbaz"]
    assert light.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)

    light_encoder, reference_encoder = PromptEncoder(light), PromptEncoder(reference)
    assert light_encoder.control_ids == reference_encoder.control_ids
    for text in TEXTS:
        for add in (False, True):
            assert light.encode(text, add_special_tokens=add) == reference.encode(text, add_special_tokens=add), text
        ids = light_encoder.plain(text)
        assert ids == reference_encoder.plain(text) and light_encoder.parse_special(text) == \
            reference_encoder.parse_special(text), text
        for skip in (False, True):
            assert light.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    rng = random.Random(14)
    for _ in range(20):  # any id sequence decodes alike, control tokens and split byte sequences included
        ids = [rng.randrange(len(reference)) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert light.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
                reference.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids

    class Args:  # config.json's EOS ids: none, so the tokenizer's and the chat turn ends count
        eos_token_ids = []

    assert eos_ids(Args, light) == eos_ids(Args, reference)
    specs = ["llama2", "llama3", "chatml", "raw"] + (["tokenizer"] if reference.chat_template else [])
    for spec in specs:
        light_template, reference_template = resolve_template(spec, light), resolve_template(spec, reference)
        for seed in range(2):
            messages = random_conversation(seed, with_system=seed == 0)
            messages[-1] = dict(messages[-1], content=messages[-1]["content"] + " </s><|eot_id|> 🙂 日本")
            light_text = light_template.render(messages, **special_token_strings(light))
            assert light_text == reference_template.render(messages, **special_token_strings(reference)), spec
            render = (lambda template, tokens: lambda m: template.render(m, **tokens))
            assert light_encoder.encode_chat(render(light_template, special_token_strings(light)), messages) == \
                reference_encoder.encode_chat(render(reference_template, special_token_strings(reference)),
                                              messages), spec
    if reference.chat_template:  # the tokenizer's own template renders as transformers renders it
        messages = random_conversation(3, with_system=True)
        assert resolve_template("tokenizer", light).render(messages) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_forms_that_transformers_converts_still_load_through_it(tmp_path):
    """SentencePiece-only folders and model-specific tokenizer classes (whose tokenizer.json transformers rebuilds
    from the vocabulary) keep transformers' tokenizer."""
    from transformers import LlamaTokenizer

    sp_dir = write_sentencepiece_folder(tmp_path / "sentencepiece", train_sentencepiece(vocab_size=600))
    LlamaTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(tmp_path / "llama_class"))
    (tmp_path / "llama_class" / "tokenizer.model").unlink(missing_ok=True)
    assert json.loads((tmp_path / "llama_class" / "tokenizer_config.json").read_text())["tokenizer_class"] \
        not in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for folder in (sp_dir, tmp_path / "llama_class"):
        assert not isinstance(load_tokenizer(folder), TokenizerFile), folder



def test_an_unreadable_tokenizer_json_is_a_one_line_error(tmp_path):
    from talis_cli.errors import TalisError

    (tmp_path / "tokenizer.json").write_text('{"model": ')
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(TalisError, match="cannot load the tokenizer") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
