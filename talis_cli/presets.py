"""Presets chosen by name (shipped as package data) or by a path to the user's own JSON file, validated.

Generation presets (gen_presets/*.json) hold GenerationConfig fields; keys a file leaves out keep
GenerationConfig's defaults. Files written for Hugging Face's GenerationConfig (the original TALIS
gen_default.json) load too: a file with a `do_sample` key takes HF's defaults for the keys it leaves out,
`do_sample: false` means greedy, and the model-describing keys HF stores there are ignored because talis
reads them from the model's own config.

The preset named `model` takes the sampling values the model folder's generation_config.json suggests
(talis_cli.model_generation_config), read the same way; it needs that folder, so it is resolved with one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UsageError
from .json_files import parse_json_object, read_json_object
from .generation import FIELD_NAMES, GenerationConfig

GEN_PRESETS_PACKAGE = "gen_presets"
MODEL_PRESET = "model"  # the model folder's own suggested values
# Keys HF writes into generation_config.json that describe the model, not the sampling.
HF_MODEL_KEYS = ("_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id")
# What HF's GenerationConfig assumes for keys such a file leaves out (penalties look at the whole context).
HF_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0, repetition_window=0)
HF_HINTS = {
    "max_length": "use max_new_tokens (max_length counts the prompt too)",
    "min_length": "talis has no minimum length; remove it",
}


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".json") or "/" in name_or_path or "\\" in name_or_path


def list_generation_presets() -> list[str]:
    """Names of the generation presets shipped with talis, sorted."""
    return sorted(p.name[: -len(".json")] for p in resources.files(GEN_PRESETS_PACKAGE).iterdir() if p.name.endswith(".json"))


def _read_json_object(name_or_path: str, package: str, available: list[str]) -> tuple[dict, str]:
    """(parsed object, source name for messages) for a preset name or a path."""
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise UsageError(f"{path}: no such file; give a preset name ({', '.join(available)}) or a JSON file")
        return read_json_object(path, UsageError), str(path)
    source = f"{package}/{name_or_path}.json"
    entry = resources.files(package) / f"{name_or_path}.json"
    if not entry.is_file():
        raise UsageError(f"unknown preset {name_or_path!r}; choose one of {', '.join(available)} or give a path to a JSON file")
    return parse_json_object(entry.read_text(encoding="utf-8"), source, UsageError), source


def load_generation_preset(name_or_path: str, model_dir: Path | str | None = None) -> GenerationConfig:
    """A validated GenerationConfig from a shipped preset name ("default", "greedy", ...), a JSON file path, or
    `model`: the sampling values suggested by `model_dir`'s generation_config.json.

    Raises UsageError naming the file for a bad preset, and for `model` when the folder suggests no values.
    """
    if name_or_path == MODEL_PRESET:
        return model_preset(model_dir)
    data, source = _read_json_object(name_or_path, GEN_PRESETS_PACKAGE,
                                     list_generation_presets() + [MODEL_PRESET])
    return _generation_config(data, source, hf_style="do_sample" in data)


def model_preset(model_dir: Path | str | None) -> GenerationConfig:
    """The `model` preset: HF's defaults with the sampling values of the folder's generation_config.json on top
    (the values are meant for HF's sampler, so keys the file leaves out take HF's defaults, as for a preset file
    with `do_sample`)."""
    from .model_generation_config import FILE_NAME, SAMPLING_KEYS, read_generation_config, suggested_sampling

    if model_dir is None:
        raise UsageError(f"--preset {MODEL_PRESET} needs a model folder; pass --model or choose another preset")
    path = Path(model_dir) / FILE_NAME
    values = suggested_sampling(read_generation_config(model_dir))  # a broken file: TalisError naming it
    if not values:
        found = "has no sampling values (" + ", ".join(SAMPLING_KEYS) + ")" if path.is_file() else "does not exist"
        raise UsageError(f"--preset {MODEL_PRESET}: {path} {found}; choose another preset "
                         f"({', '.join(list_generation_presets())})")
    return _generation_config(values, str(path), hf_style=True)


def _generation_config(data: dict, source: str, hf_style: bool) -> GenerationConfig:
    """GenerationConfig of a preset's keys; HF-style presets take HF's defaults for the keys they leave out."""
    settings = dict(HF_DEFAULTS) if hf_style else {}
    for key, value in data.items():
        if key in FIELD_NAMES:
            settings[key] = value
        elif key == "do_sample":
            if not isinstance(value, bool):
                raise UsageError(f"{source}: do_sample = {value!r} is out of range: allowed true or false")
        elif key in HF_HINTS:
            raise UsageError(f"{source}: key {key!r} is not supported; {HF_HINTS[key]}")
        elif key not in HF_MODEL_KEYS:
            raise UsageError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(FIELD_NAMES + ('do_sample',))}")
    if data.get("do_sample") is False:
        settings["temperature"] = 0.0
    try:
        return GenerationConfig(**settings).validate()
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
