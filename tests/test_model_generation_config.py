"""The model folder's generation_config.json (issue 15 kind 2): its EOS ids end replies, `talis info` shows its
sampling values, and the preset `model` takes them."""

import json
import shutil

import pytest

from talis_cli.engine import Engine, LoadSettings
from talis_cli.errors import TalisError, UsageError
from talis_cli.generation import GenerationConfig
from tests.test_cli import one_line_error, run_talis
from tests.tiny_models import hf_model, save_fp16

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)
LLAMA3_STYLE = {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096,
                "transformers_version": "4.40.0"}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A tiny fp16 model folder without generation_config.json."""
    return save_fp16(hf_model(seed=21), tmp_path_factory.mktemp("gen_config") / "plain")


def greedy_run(folder):
    engine = Engine.load(LoadSettings(model_dir=folder))
    events = list(engine.generator.stream(engine.encode("And God said"), GREEDY))
    return engine, [e.token_ids[0] for e in events], events[-1].finish_reason


def with_generation_config(plain_dir, tmp_path, data) -> object:
    folder = tmp_path / "model"
    shutil.copytree(plain_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(data) if isinstance(data, dict) else data)
    return folder


def test_an_extra_eos_id_of_generation_config_ends_the_reply(plain_dir, tmp_path):
    engine, tokens, reason = greedy_run(plain_dir)
    assert reason == "length" and len(tokens) == GREEDY.max_new_tokens
    # the end-of-turn token: a token greedy decoding reaches for the first time after a few others
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] not in engine.eos_ids)
    folder = with_generation_config(plain_dir, tmp_path, dict(LLAMA3_STYLE, eos_token_id=[2, tokens[k]]))
    stopping, stopped, reason = greedy_run(folder)
    assert stopped == tokens[:k + 1] and reason == "eos"
    assert set(stopping.eos_ids) == set(engine.eos_ids) | {tokens[k]}  # the union: config.json's 2 is still there
    info = stopping.info
    assert info["suggested_sampling"] == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert tokens[k] in info["eos_token_ids"]
    assert "suggested_sampling" not in engine.info  # nothing to suggest without the file


def test_the_model_preset_takes_the_suggested_values(plain_dir, tmp_path):
    from talis_cli.settings import resolve_settings

    folder = with_generation_config(plain_dir, tmp_path, dict(LLAMA3_STYLE, eos_token_id=2, top_k=20))
    config = resolve_settings({"model": folder, "preset": "model"}).generation_config()
    # HF's defaults for what the file leaves out, as HF's sampler would read it
    assert config == GenerationConfig(temperature=0.6, top_p=0.9, top_k=20, min_p=0.0, typical_p=1.0,
                                      repetition_penalty=1.0, repetition_window=0)
    flag_wins = resolve_settings({"model": folder, "preset": "model", "temperature": 0.3}).generation_config()
    assert flag_wins.temperature == 0.3 and flag_wins.top_p == 0.9
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert resolve_settings({"model": folder, "preset": "model"}).generation_config().temperature == 0.0  # greedy


def test_the_model_preset_without_suggested_values_is_a_usage_error(plain_dir, tmp_path):
    result = run_talis("generate", "-m", plain_dir, "--preset", "model", "-p", "hello")
    assert result.returncode == 2 and result.stdout == b""
    assert f"--preset model: {plain_dir / 'generation_config.json'} does not exist" in one_line_error(result)
    folder = with_generation_config(plain_dir, tmp_path, {"eos_token_id": 2, "max_length": 4096})
    from talis_cli.presets import load_generation_preset

    with pytest.raises(UsageError, match="generation_config.json has no sampling values"):
        load_generation_preset("model", folder)


@pytest.mark.parametrize("text, message", [('{"eos_token_id": [2,', "generation_config.json:1:"),
                                           ('{"eos_token_id": "</s>"}', "eos_token_id = '</s>' is not a token id")])
def test_a_broken_generation_config_is_one_line_naming_the_file(plain_dir, tmp_path, text, message):
    folder = with_generation_config(plain_dir, tmp_path, text)
    with pytest.raises(TalisError, match=message) as raised:
        Engine.load(LoadSettings(model_dir=folder))
    assert str(folder / "generation_config.json") in str(raised.value) and "\n" not in str(raised.value)
