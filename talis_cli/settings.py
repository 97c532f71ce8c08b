"""Where each run setting comes from: command-line flags > a --config file > the generation preset > defaults.

A config file holds the same settings as the flags, as JSON, TOML or ``KEY=VALUE`` lines (``#`` comments).
Names may be spelled like the flags (``max-seq-len``, ``max_seq_len``) or as the original project
spelled them: MODEL_DIR, CHECKPOINTS, WBITS, GROUPSIZE, GEN_CONFIG (the preset), DEVICE_MAP.
This module imports neither torch nor the engine until a model or a generation config is asked for.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from talis_cli.errors import UsageError

# Setting name -> type a config file's value is converted to.
LOAD_SETTINGS = {"model": Path, "checkpoint": Path, "wbits": int, "groupsize": int, "device_map": str,
                 "max_memory": str, "max_seq_len": int, "kv_cache": str, "backend": str, "allow_pickle": bool,
                 "threads": int, "tokenizer": Path, "tensor_parallel": int}
SAMPLING_SETTINGS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                     "typical_p": float, "repetition_penalty": float, "repetition_window": int,
                     "frequency_penalty": float, "presence_penalty": float, "seed": int, "stop": list}
OTHER_SETTINGS = {"preset": str, "template": str, "system": str}
SETTING_TYPES = {**LOAD_SETTINGS, **SAMPLING_SETTINGS, **OTHER_SETTINGS}

# Other spellings (after lower-casing and "-" -> "_") -> setting name.
ALIASES = {"model_dir": "model", "checkpoints": "checkpoint", "gen_config": "preset", "bits": "wbits",
           "group_size": "groupsize", "n": "max_new_tokens", "tokenizer_dir": "tokenizer"}

# Settings that may name a file; a relative file name in a config file is relative to that file.
FILE_SETTINGS = ("model", "checkpoint", "device_map", "preset", "template", "tokenizer")


@dataclass
class RunSettings:
    """Every setting of one run, after merging; None means "not set anywhere, use the default"."""

    model: Optional[Path] = None
    checkpoint: Optional[Path] = None
    wbits: Optional[int] = None
    groupsize: Optional[int] = None
    device_map: Optional[str] = None
    max_memory: Optional[str] = None
    max_seq_len: Optional[int] = None
    kv_cache: Optional[str] = None  # KV cache type: fp16, int8 or fp8
    backend: Optional[str] = None
    allow_pickle: Optional[bool] = None
    threads: Optional[int] = None
    tokenizer: Optional[Path] = None  # folder of the tokenizer files when the model folder has none
    tensor_parallel: Optional[int] = None  # ranks (GPUs) holding 1/N of every layer each
    preset: Optional[str] = None
    template: Optional[str] = None
    system: Optional[str] = None
    sampling: dict = field(default_factory=dict)  # sampling settings that were given, by name

    def load_settings(self):
        """The engine's LoadSettings for these settings (imports the engine)."""
        from talis_cli.engine import LoadSettings

        given = {"model_dir": self.model, "checkpoint": self.checkpoint, "wbits": self.wbits,
                 "groupsize": self.groupsize, "device_map": self.device_map, "max_memory": self.max_memory,
                 "max_seq_len": self.max_seq_len, "kv_cache": self.kv_cache, "backend": self.backend,
                 "allow_pickle": self.allow_pickle, "threads": self.threads, "tokenizer": self.tokenizer,
                 "tensor_parallel": self.tensor_parallel}
        return LoadSettings(**{name: value for name, value in given.items() if value is not None})

    def generation_config(self):
        """The preset (or the defaults) with the given sampling settings on top, validated."""
        from talis_cli.generation import GenerationConfig

        if self.preset is None:
            base = GenerationConfig()
        else:
            from talis_cli.engine import DEFAULT_MODEL_DIR
            from talis_cli.presets import load_generation_preset

            base = load_generation_preset(self.preset, self.model or DEFAULT_MODEL_DIR)  # `model` reads the folder
        config = base.with_overrides(**self.sampling) if self.sampling else base
        config.validate()
        return config


def canonical_name(key: str) -> Optional[str]:
    """The setting a config-file key stands for, or None when it is none of them."""
    name = key.strip().lower().replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in SETTING_TYPES else None


def convert_setting(name: str, value, origin: str):
    """`value` as the type of setting `name` (config files may hold strings for everything)."""
    kind = SETTING_TYPES[name]
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise UsageError(f"{origin}: {name} must be a string or a list of strings, got {value!r}")
    if kind is Path:
        return Path(str(value)).expanduser()
    if kind is bool:
        words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
        if isinstance(value, bool) or str(value).strip().lower() in words:
            return value if isinstance(value, bool) else words[str(value).strip().lower()]
        raise UsageError(f"{origin}: {name} must be true or false, got {value!r}")
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise UsageError(f"{origin}: {name} must be a {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        from talis_cli.generation import FIELD_NAMES, allowed_values

        noun = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        allowed = f" (allowed: {allowed_values(name)})" if name in FIELD_NAMES else ""
        raise UsageError(f"{origin}: {name} must be {noun}, got {value!r}{allowed}") from None


def _parse_key_values(text: str, origin: str) -> dict:
    """``KEY=VALUE`` lines (shell or .env style); quotes around a value are dropped."""
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise UsageError(f"{origin} line {number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_config_file(path: Path) -> dict:
    """Settings held in the file at `path`, by canonical name, converted to their types."""
    origin = f"config file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{origin} does not exist: check the --config path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{origin} cannot be read ({exc})") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = _parse_key_values(text, origin)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise UsageError(f"{origin} is not valid {suffix.lstrip('.').upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{origin} must hold an object of settings, not {type(raw).__name__}")

    settings = {}
    for key, value in raw.items():
        name = canonical_name(key)
        if name is None:
            raise UsageError(f"{origin}: unknown setting '{key}'; known: {', '.join(SETTING_TYPES)}")
        if value is None:
            continue
        value = convert_setting(name, value, origin)
        if name in FILE_SETTINGS:
            value = _relative_to(Path(path).parent, value)
        settings[name] = value
    return settings


def _relative_to(folder: Path, value):
    """A relative file name resolved against the config file's folder, when such a file exists there."""
    candidate = folder / str(value)
    if not Path(str(value)).is_absolute() and candidate.exists():
        return type(value)(candidate) if isinstance(value, Path) else str(candidate)
    return value


def resolve_settings(flags: dict, config_file: Optional[Path] = None) -> RunSettings:
    """Merge `flags` (setting name -> value, None = not given) over the settings of `config_file`."""
    merged = read_config_file(config_file) if config_file is not None else {}
    for name, value in flags.items():
        if name not in SETTING_TYPES:
            raise KeyError(f"flag {name!r} is not a run setting")
        if value is None or (isinstance(value, (list, tuple)) and not value):  # not given (repeatable: empty)
            continue
        merged[name] = list(value) if isinstance(value, tuple) else value
    sampling = {name: merged.pop(name) for name in list(merged) if name in SAMPLING_SETTINGS}
    return RunSettings(**merged, sampling=sampling)
