"""Reading the JSON files users hand us (configs, presets, device maps) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TalisError


def parse_json_object(text: str, source: str, error: type[TalisError] = TalisError) -> dict:
    """Parse `text` (from `source`, named in messages) that must hold a JSON object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}:{e.lineno}:{e.colno}: broken JSON ({e.msg}); fix the file") from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a JSON object, found {type(data).__name__}")
    return data


def read_json_object(path: Path, error: type[TalisError] = TalisError) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e.__class__.__name__}); check the file") from None
    return parse_json_object(text, str(path), error)
