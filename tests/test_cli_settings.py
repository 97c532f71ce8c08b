"""Settings precedence: flags > --config file > preset > defaults, in every config-file form."""

import json
from importlib.resources import files

import pytest

from talis_cli.errors import UsageError
from talis_cli.generation import FIELD_NAMES, GenerationConfig
from talis_cli.presets import load_generation_preset
from talis_cli.settings import read_config_file, resolve_settings


def no_flags(**given) -> dict:
    flags = dict(model=None, checkpoint=None, wbits=None, groupsize=None, device_map=None, max_seq_len=None,
                 preset=None, template=None, temperature=None, top_k=None, stop=[])
    flags.update(given)
    return flags


def test_flags_beat_the_config_file_which_beats_the_preset_which_beats_the_defaults(tmp_path):
    config = tmp_path / "talis.json"
    config.write_text(json.dumps({"preset": "creative", "temperature": 0.3, "top_k": 7, "max-seq-len": 99}))
    preset = load_generation_preset("creative")
    defaults = GenerationConfig()

    settings = resolve_settings(no_flags(top_k=3), config)
    generation = settings.generation_config()
    assert generation.top_k == 3  # flag
    assert generation.temperature == 0.3 and settings.max_seq_len == 99  # config file
    named_by_preset = set(json.loads((files("gen_presets") / "creative.json").read_text()))
    for name in set(FIELD_NAMES) - {"temperature", "top_k"}:
        source = preset if name in named_by_preset else defaults
        assert getattr(generation, name) == getattr(source, name), name
    assert resolve_settings(no_flags(preset="greedy", temperature=0.9), config).generation_config() == \
        load_generation_preset("greedy").with_overrides(top_k=7, temperature=0.9)
    assert resolve_settings(no_flags(), None).generation_config() == defaults


def test_the_original_projects_names_in_a_key_value_file(tmp_path):
    (tmp_path / "models" / "llama-65b").mkdir(parents=True)
    (tmp_path / "gen.json").write_text(json.dumps({"do_sample": True, "temperature": 0.5, "top_p": 0.8}))
    config = tmp_path / "talis.env"
    config.write_text("# the seed project's settings\n"
                      "MODEL_DIR=models/llama-65b\nCHECKPOINTS='llama65b-4bit.safetensors'\n"
                      'WBITS="4"\nGROUPSIZE=128\nGEN_CONFIG=gen.json\nexport DEVICE_MAP=standard\n')
    settings = resolve_settings(no_flags(), config)
    assert settings.model == tmp_path / "models" / "llama-65b"  # relative to the config file
    assert settings.checkpoint.name == "llama65b-4bit.safetensors"
    assert (settings.wbits, settings.groupsize, settings.device_map) == (4, 128, "standard")
    assert settings.generation_config() == load_generation_preset(str(tmp_path / "gen.json"))


def test_toml_config_and_stop_lists(tmp_path):
    config = tmp_path / "talis.toml"
    config.write_text('template = "chatml"\nstop = ["User:", "###"]\nseed = 5\n')
    settings = resolve_settings(no_flags(), config)
    assert settings.template == "chatml"
    assert settings.generation_config().stop == ("User:", "###") and settings.generation_config().seed == 5
    assert resolve_settings(no_flags(stop=["END"]), config).generation_config().stop == ("END",)


@pytest.mark.parametrize("text, suffix, needle", [
    ('{"temprature": 0.5}', ".json", "unknown setting 'temprature'"),
    ("WBITS=four", ".env", "wbits must be an integer, got 'four'"),
    ('{"temperature": "hot"}', ".json", "temperature must be a number"),
    ("[1, 2]", ".json", "must hold an object of settings"),
    ("{", ".json", "is not valid JSON"),
    ("just words", ".cfg", "expected KEY=VALUE"),
])
def test_bad_config_files_are_one_line_usage_errors(tmp_path, text, suffix, needle):
    config = tmp_path / f"talis{suffix}"
    config.write_text(text)
    with pytest.raises(UsageError, match=needle) as info:
        read_config_file(config)
    assert "\n" not in str(info.value)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve_settings(no_flags(), tmp_path / "absent.json")


def test_out_of_range_values_from_a_config_file_name_the_allowed_range(tmp_path):
    config = tmp_path / "talis.json"
    config.write_text('{"top_p": 1.5}')
    with pytest.raises(UsageError, match=r"top_p = 1.5 is out of range: allowed 0 < top_p <= 1"):
        resolve_settings(no_flags(), config).generation_config()


@pytest.mark.parametrize("name, value, allowed", [("top_p", "abc", "0 < top_p <= 1"), ("top_k", "1.5", "an integer >= 0")])
def test_a_value_of_the_wrong_type_names_the_allowed_range(name, value, allowed):
    from talis_cli.settings import convert_setting

    with pytest.raises(UsageError, match=f"{name} must be .*got '{value}'.*allowed: {allowed}"):
        convert_setting(name, value, "/set")


@pytest.mark.parametrize("name, value", [("stop", 5), ("stop", ["ok", 3]), ("max_new_tokens", 2.7)])
def test_config_values_of_the_wrong_shape_are_refused(name, value):
    from talis_cli.settings import convert_setting

    with pytest.raises(UsageError, match=f"{name} must be"):
        convert_setting(name, value, "talis.json")
