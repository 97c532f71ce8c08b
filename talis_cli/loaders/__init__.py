"""Model loaders, picked by what a model folder holds.

Each loader is a class registered by name. Third-party packages add one through the entry-point group
`talis.loaders` (the entry point names a Loader subclass); it then competes by its `priority` and `detect`.
"""

from __future__ import annotations

from ..errors import TalisError
from .base import LoadedModel, Loader, LoadRequest, QuantSettings

_LOADERS: dict[str, type[Loader]] = {}


def register_loader(cls: type[Loader]) -> type[Loader]:
    _LOADERS[cls.name] = cls
    return cls


def registered_loaders() -> dict[str, type[Loader]]:
    _load_entry_points()
    return dict(_LOADERS)


def pick_loader(request: LoadRequest, name: str | None = None) -> Loader:
    """The named loader, or the highest-priority one whose `detect` accepts the request."""
    loaders = registered_loaders()
    if name:
        if name not in loaders:
            raise TalisError(f"unknown loader {name!r}; available: {', '.join(sorted(loaders))}")
        return loaders[name](request)
    folder = request.model_dir
    if not folder.is_dir():
        raise TalisError(f"model folder {folder} does not exist; pass --model with a folder holding config.json and weights")
    if not any(folder.iterdir()):
        raise TalisError(f"model folder {folder} is empty; it needs config.json, the tokenizer files and the weights")
    for cls in sorted(loaders.values(), key=lambda c: -c.priority):
        if cls.detect(request):
            return cls(request)
    raise TalisError(f"{folder}: found no weights talis can read (GPTQ or fp16 .safetensors); pass --checkpoint FILE if they lie elsewhere")


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="talis.loaders"):
        register_loader(ep.load())


from . import checkpoint_file, fp16, gptq  # noqa: E402,F401  (registers the built-in loaders)

__all__ = ["LoadRequest", "LoadedModel", "Loader", "QuantSettings", "pick_loader", "register_loader", "registered_loaders"]
