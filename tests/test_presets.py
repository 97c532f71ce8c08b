"""Generation presets: shipped ones load, user files are validated with messages naming file, key and range."""

import json

import pytest

from talis_cli.errors import UsageError
from talis_cli.generation import FIELD_NAMES, GenerationConfig
from talis_cli.presets import list_generation_presets, load_generation_preset

# The keys of the original project's gen_default.json (a Hugging Face GenerationConfig file).
ORIGINAL_GEN_DEFAULT = {
    "_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "transformers_version": "4.28.1", "do_sample": True, "max_new_tokens": 20, "top_k": 50,
    "top_p": 0.5, "temperature": 0.7, "repetition_penalty": 1.2, "typical_p": 1.0,
}


def write(tmp_path, content, name: str = "mine.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return str(path)


def test_shipped_presets_load_and_differ():
    names = list_generation_presets()
    assert {"default", "greedy", "precise", "creative", "gen_default"} <= set(names)
    configs = {name: load_generation_preset(name) for name in names}
    assert len(set(configs.values())) == len(configs)
    assert configs["greedy"].temperature == 0
    assert configs["default"] == GenerationConfig()  # the dataclass defaults are the default preset
    assert (configs["precise"].top_p, configs["precise"].repetition_penalty) == (0.1, 1.18)
    assert configs["creative"].top_k == 0


def test_original_hf_style_file_loads_with_hf_defaults(tmp_path):
    cfg = load_generation_preset(write(tmp_path, ORIGINAL_GEN_DEFAULT))
    assert (cfg.max_new_tokens, cfg.top_k, cfg.top_p, cfg.temperature) == (20, 50, 0.5, 0.7)
    # keys it leaves out mean what they mean in HF: no min_p, penalty over the whole context
    assert (cfg.min_p, cfg.repetition_window, cfg.repetition_penalty) == (0.0, 0, 1.2)
    greedy = load_generation_preset(write(tmp_path, {**ORIGINAL_GEN_DEFAULT, "do_sample": False}))
    assert greedy.temperature == 0


def test_user_file_overrides_only_its_keys(tmp_path):
    cfg = load_generation_preset(write(tmp_path, {"top_k": 7, "stop": ["User:"], "seed": 3}))
    assert cfg == GenerationConfig(top_k=7, stop=["User:"], seed=3)
    assert cfg.stop == ("User:",)


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, {"temprature": 0.5})
    with pytest.raises(UsageError) as e:
        load_generation_preset(path)
    msg = str(e.value)
    assert path in msg and "'temprature'" in msg and all(k in msg for k in FIELD_NAMES)
    assert "\n" not in msg


def test_hf_length_keys_say_what_to_use(tmp_path):
    with pytest.raises(UsageError, match="max_length.*max_new_tokens"):
        load_generation_preset(write(tmp_path, {"max_length": 100}))


@pytest.mark.parametrize("key, value, range_words", [
    ("top_p", 1.5, "0 < top_p <= 1"),
    ("temperature", -0.1, ">= 0"),
    ("top_k", 2.5, "integer >= 0"),
    ("max_new_tokens", 0, "integer >= 1"),
    ("presence_penalty", 3, "-2 <= presence_penalty <= 2"),
    ("repetition_penalty", 0, "> 0"),
    ("do_sample", "yes", "true or false"),
    ("stop", [""], "non-empty strings"),
])
def test_out_of_range_value_names_file_key_value_and_range(tmp_path, key, value, range_words):
    path = write(tmp_path, {key: value})
    with pytest.raises(UsageError) as e:
        load_generation_preset(path)
    msg = str(e.value)
    assert msg.startswith(path) and key in msg and repr(value) in msg and range_words in msg


def test_broken_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '{\n  "top_k": 40,\n  "top_p": 0.9\n  "min_p": 0.1\n}\n')
    with pytest.raises(UsageError, match=rf"^{path}:4:\d+: broken JSON"):
        load_generation_preset(path)


def test_not_an_object_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(UsageError, match="expected a JSON object"):
        load_generation_preset(write(tmp_path, "[1, 2]"))
    with pytest.raises(UsageError, match="no such file"):
        load_generation_preset(str(tmp_path / "absent.json"))
    with pytest.raises(UsageError, match="unknown preset 'wild'.*greedy"):
        load_generation_preset("wild")


@pytest.mark.parametrize("field, bad", [
    ("max_new_tokens", -1), ("temperature", -1.0), ("top_k", -3), ("top_p", 0.0), ("min_p", 1.01),
    ("typical_p", 0), ("repetition_penalty", -1.0), ("repetition_window", -1),
    ("frequency_penalty", -2.5), ("presence_penalty", 2.01), ("seed", 1.5), ("top_k", True),
])
def test_validate_rejects_each_bad_value(field, bad):
    with pytest.raises(UsageError, match=rf"^{field} = "):
        GenerationConfig(**{field: bad}).validate()


def test_with_overrides_ignores_missing_flags_and_validates():
    base = GenerationConfig()
    cfg = base.with_overrides(temperature=0, top_k=None, stop=["\n\n"])
    assert (cfg.temperature, cfg.top_k, cfg.stop) == (0.0, base.top_k, ("\n\n",))
    with pytest.raises(UsageError, match="top_p"):
        base.with_overrides(top_p=2)
    with pytest.raises(UsageError, match="unknown generation setting 'topk'"):
        base.with_overrides(topk=3)
