"""Tokenizer files as model folders have them (issue 15, kinds 1 and 4): a SentencePiece-only LLaMA folder loads
with the SentencePiece model's own ids and prints nothing; a folder without tokenizer files says what is accepted
and suggests --tokenizer, which (as the `tokenizer` key of a --config file too) points at another folder."""

import json
import shutil

import pytest

from talis_cli.errors import TalisError, UsageError
from talis_cli.tokenizer import PromptEncoder, load_tokenizer
from tests.test_cli import one_line_error, run_talis
from tests.tokenizer_fixtures import (LLAMA_CONFIG, train_sentencepiece, write_sentencepiece_folder,
                                      write_tiny_model)

TEXTS = ["In the beginning God created the heaven and the earth.", " leading space", "two  spaces and trailing  ",
         "line\n\n  indented\tand tabbed", "digits 1611 and 42", "</s> and <s> are text here",
         "emoji 🙂🕊️, é ü ß", "日本語のテキスト", "\u2581 a visible-space mark", ""]


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    return train_sentencepiece()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sentencepiece_model):
    return write_sentencepiece_folder(tmp_path_factory.mktemp("sp_tokenizer"), sentencepiece_model)


@pytest.mark.parametrize("trainer_options, config", [
    ({}, LLAMA_CONFIG),
    ({}, {**LLAMA_CONFIG, "tokenizer_class": "LLaMATokenizer"}),  # the spelling of early-2023 conversions
    ({}, None),  # no tokenizer_config.json at all
    ({"remove_extra_whitespaces": True}, LLAMA_CONFIG),  # SentencePiece's default, unlike LLaMA's
    ({"add_dummy_prefix": False}, LLAMA_CONFIG),
])
def test_sentencepiece_only_folder_gives_the_models_own_ids(tmp_path, sentencepiece_model, trainer_options, config):
    import sentencepiece as spm

    model = train_sentencepiece(**trainer_options) if trainer_options else sentencepiece_model
    folder = write_sentencepiece_folder(tmp_path, model, config)
    if config is None:
        (folder / "tokenizer_config.json").unlink()
    reference = spm.SentencePieceProcessor(model_proto=model)
    tokenizer = load_tokenizer(folder)
    encoder = PromptEncoder(tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (reference.bos_id(), reference.eos_id())
    for text in TEXTS:
        ids = encoder.plain(text)
        assert ids == reference.encode(text), text
        if trainer_options.get("remove_extra_whitespaces"):
            continue  # that normalization drops spaces: the text cannot come back
        assert tokenizer.decode(ids) == reference.decode(ids)
        if "\u2581" not in text:  # (U+2581 decodes as a space)
            assert tokenizer.decode(ids) == text
    assert any(reference.id_to_piece(i).startswith("<0x") for i in encoder.plain("🕊️"))  # byte fallback at work


def test_sentencepiece_folder_loads_without_chatter(sp_dir, capfd):
    load_tokenizer(sp_dir)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_generate_on_a_sentencepiece_folder(tmp_path, sp_dir):
    """A LLaMA folder as the original project's users had it: tokenizer.model and tokenizer_config.json only."""
    import sentencepiece as spm

    folder = write_tiny_model(tmp_path / "llama", vocab_size=4000)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(sp_dir / name, folder / name)
    prompt = "And God said, Let there be light 🙂"
    result = run_talis("generate", "-m", folder, "-p", prompt, "--json", "--temperature", "0", "-n", "4")
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    record = json.loads(result.stdout)
    reference = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert record["prompt_tokens"] == 1 + len(reference.encode(prompt))  # BOS + SentencePiece's own ids
    assert record["generated_tokens"] == 4


def test_add_bos_token_false_leaves_the_bos_out(tmp_path, sentencepiece_model):
    """A SentencePiece-only folder whose tokenizer_config.json says add_bos_token: false: transformers' converted
    tokenizer encodes without BOS, and so does talis."""
    from transformers import AutoTokenizer

    folder = write_tiny_model(tmp_path / "llama", vocab_size=4000)
    write_sentencepiece_folder(folder, sentencepiece_model, {**LLAMA_CONFIG, "add_bos_token": False})
    prompt = "And God said, Let there be light"
    result = run_talis("generate", "-m", folder, "-p", prompt, "--json", "--temperature", "0", "-n", "1")
    assert result.returncode == 0, result.stderr.decode()
    reference = AutoTokenizer.from_pretrained(str(folder))(prompt)["input_ids"]
    assert reference[0] != 1  # no BOS from transformers either
    assert json.loads(result.stdout)["prompt_tokens"] == len(reference)


@pytest.mark.parametrize("light", [True, False])
@pytest.mark.parametrize("post_processor,add_bos_token", [(True, False), (False, True), (True, None)])
def test_bos_follows_what_the_tokenizers_own_encode_adds(tmp_path, light, post_processor, add_bos_token):
    """A tokenizer.json folder: transformers lets its post-processor decide (add_bos_token is ignored then), and
    so does talis; settings in tokenizer.json that would cut or pad the ids (truncation, padding) are switched off,
    as transformers switches them off for each encode."""
    from transformers import AutoTokenizer

    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.tokenizer import adds_bos
    from tests.tokenizer_fixtures import kjv_tokenizer_dir

    folder = write_tiny_model(tmp_path / "llama", vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kjv_tokenizer_dir() / name, folder / name)
    pipeline = json.loads((folder / "tokenizer.json").read_text())
    pipeline["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    pipeline["padding"] = {"strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": None,
                           "pad_id": 2, "pad_type_id": 0, "pad_token": "</s>"}
    if not post_processor:
        pipeline["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(pipeline))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("add_bos_token", None)
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    text = "And God said, Let there be light: and there was light."
    reference = AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    assert len(reference) > 12 and (reference[0] == 1) == post_processor
    engine = Engine.load(LoadSettings(model_dir=folder, device_map="cpu"))
    if not light:  # the transformers tokenizer in the engine's place
        engine.tokenizer = load_tokenizer(folder, light=False)
        engine.encoder, engine.add_bos = PromptEncoder(engine.tokenizer), adds_bos(engine.tokenizer)
    assert engine.encode(text) == reference


def test_a_folder_without_tokenizer_files_suggests_the_tokenizer_option(tmp_path, sp_dir):
    folder = write_tiny_model(tmp_path / "autogptq_style", vocab_size=4000)
    failed = run_talis("generate", "-m", folder, "-p", "In the beginning", "-n", "2")
    assert failed.returncode == 2
    message = one_line_error(failed)
    assert f"{folder} has no tokenizer files" in message
    assert "tokenizer.json, or tokenizer.model (SentencePiece) with tokenizer_config.json" in message
    assert "--tokenizer DIR" in message

    config = tmp_path / "talis.toml"
    config.write_text(f'tokenizer = "{sp_dir}"\n')
    ran = run_talis("generate", "-m", folder, "--config", config, "-p", "In the beginning", "--json", "-n", "2",
                    "--temperature", "0")
    assert ran.returncode == 0 and ran.stderr == b"", ran.stderr.decode()
    expected = 1 + len(PromptEncoder(load_tokenizer(sp_dir)).plain("In the beginning"))
    assert json.loads(ran.stdout)["prompt_tokens"] == expected


def test_tokenizer_option_and_config_key(tmp_path, sp_dir):
    from talis_cli.cli import LoadFlags, run_settings
    from talis_cli.settings import resolve_settings

    config = tmp_path / "talis.env"
    config.write_text("TOKENIZER_DIR=spm\n")
    (tmp_path / "spm").mkdir()
    assert resolve_settings({}, config).tokenizer == tmp_path / "spm"  # relative to the config file
    assert resolve_settings({"tokenizer": sp_dir}, config).load_settings().tokenizer == sp_dir  # the flag wins
    with pytest.raises(UsageError, match="tokenizer folder .*nowhere does not exist: check --tokenizer"):
        run_settings(LoadFlags(tokenizer=tmp_path / "nowhere"))


def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path, sentencepiece_model):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    broken = write_sentencepiece_folder(tmp_path / "broken", b"\x00not a model\xff" * 10)
    with pytest.raises(TalisError, match="is not a SentencePiece model") as info:
        load_tokenizer(broken)
    assert "\n" not in str(info.value)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sentencepiece_model)
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    unigram = write_sentencepiece_folder(tmp_path / "unigram", proto.SerializeToString())
    with pytest.raises(TalisError, match="SentencePiece UNIGRAM model; talis reads SentencePiece BPE"):
        load_tokenizer(unigram)
    assert spm  # the reference library is importable where these tests run


def test_quantize_takes_the_tokenizer_from_another_folder(tmp_path, sp_dir):
    import sentencepiece as spm

    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.quantize import quantize_model

    source = write_tiny_model(tmp_path / "fp16", vocab_size=4000)
    with pytest.raises(UsageError, match="tokenizer folder .*missing does not exist"):
        quantize_model(source, tmp_path / "never", method="rtn", group_size=64, tokenizer_dir=tmp_path / "missing")
    out = quantize_model(source, tmp_path / "gptq", method="rtn", group_size=64, tokenizer_dir=sp_dir)
    assert (out / "tokenizer.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    engine = Engine.load(LoadSettings(model_dir=out))
    reference = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert engine.encode("Let there be light") == [reference.bos_id()] + reference.encode("Let there be light")
