"""Device maps: which device each part of the model lives on.

Two file forms are accepted:
- accelerate's: {"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.norm": 1, "lm_head": 1}
  (module-name prefix -> GPU index, "cuda:N", "cpu"; "" or "*" as a catch-all);
- compact: {"layers": {"0-39": 0, "40-79": 1}, "embed_tokens": 0, "norm": 1, "lm_head": 1}, or
  {"gpu_split": [20, 24]} (GiB each GPU may hold, filled in order), or {"device": "cpu" | 0 | "auto"}.
"auto" plans from the free memory of every GPU, or from --max-memory (see memory_plan.py).
Named maps (auto, cpu, single_gpu, standard) are the files in the packaged device_maps/ folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import TalisError, UsageError
from .json_files import read_json_object
from .memory_plan import GiB, Footprint, available_memory, check_fits, plan_by_capacity

COMPACT_KEYS = {"layers", "embed_tokens", "norm", "lm_head", "gpu_split", "device"}
TENSOR_PARALLEL_KEY = "tensor_parallel"  # N ranks, each with 1/N of every layer (talis_cli.tensor_parallel)


@dataclass
class DevicePlan:
    """Module-name prefix -> device string ("cpu", "cuda:0", ...); the longest matching prefix wins."""

    prefixes: dict[str, str]

    def device_for(self, name: str) -> str:
        best, best_len = None, -1
        for prefix, dev in self.prefixes.items():
            if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = dev, len(prefix)
        if best is None:
            raise TalisError(f"the device map does not place {name!r}; add an entry for it (or a catch-all \"\")")
        return best

    @property
    def devices(self) -> list[str]:
        return sorted(set(self.prefixes.values()))

    @property
    def uses_cuda(self) -> bool:
        return any(d.startswith("cuda") for d in self.devices)


def list_device_maps() -> dict[str, dict]:
    """Packaged device maps by name (built-in names included) with their contents."""
    maps = {}
    for f in sorted(resources.files("device_maps").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            maps[f.name[:-5]] = json.loads(f.read_text())
    return maps


def load_device_map(name_or_path: str | Path | None) -> tuple[str, dict]:
    """Return (label, raw map) for a packaged name or a user's JSON file."""
    spec = str(name_or_path or "auto")
    builtin = list_device_maps()
    builtin.setdefault("cuda", builtin.get("single_gpu", {"device": 0}))
    if spec in builtin:
        return spec, builtin[spec]
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"device map {spec!r} is neither a built-in name ({', '.join(builtin)}) nor an existing file")
    return str(path), read_json_object(path, UsageError)


def plan_devices(raw: dict, n_layers: int, source: str = "device map", footprint: Footprint | None = None,
                 max_memory: dict[str, int] | None = None) -> DevicePlan:
    """Turn a raw map (either form) into a DevicePlan for a model of `n_layers` layers, checking that the devices
    exist and, when the model's footprint is known, that its parts fit the capacities."""
    caps = _capacities(raw, source, max_memory) if footprint is not None else None
    if caps is not None:
        _check_available(DevicePlan({d: d for d in caps}), source)
        return DevicePlan(plan_by_capacity(footprint, caps))
    plan = _plan_from_map(raw, n_layers, source)
    _check_available(plan, source)
    if footprint is not None and max_memory:
        check_fits(footprint, {k: plan.device_for(k) for k in _parts(n_layers)}, max_memory, source)
    return plan


def _capacities(raw: dict, source: str, max_memory: dict[str, int] | None) -> dict[str, int] | None:
    """Bytes each device may hold, for the maps planned by capacity ("auto", "gpu_split"); None for the others."""
    if raw.get("device") == "auto":
        return max_memory or available_memory()
    if "gpu_split" in raw:
        return {f"cuda:{i}": int(gb * GiB) for i, gb in enumerate(_gpu_split(raw["gpu_split"], source))}
    return None


def _parts(n_layers: int) -> list[str]:
    return ["model.embed_tokens", *(f"model.layers.{i}" for i in range(n_layers)), "model.norm", "lm_head"]


def _plan_from_map(raw: dict, n_layers: int, source: str) -> DevicePlan:
    raw = {k: v for k, v in raw.items() if k != TENSOR_PARALLEL_KEY}  # read by Engine.load before planning
    if not raw:
        raw = {"device": "auto"}
    if not raw.keys() & {"layers", "gpu_split", "device"}:
        odd = [k for k in raw if not (k.startswith("model.") or k in ("lm_head", "", "*"))]
        if odd:
            raise UsageError(f"{source}: unknown key(s) {', '.join(odd)}; use module names (model.layers.N, lm_head, ...) "
                             f"or the compact keys {', '.join(sorted(COMPACT_KEYS))}")
        return DevicePlan({("" if k == "*" else k): _device(v, source, k) for k, v in raw.items()})
    return _plan_compact(raw, n_layers, source)


def _plan_compact(raw: dict, n_layers: int, source: str) -> DevicePlan:
    unknown = set(raw) - COMPACT_KEYS
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(COMPACT_KEYS))} or accelerate's module names")
    if "device" in raw:
        dev = raw["device"]
        if dev == "auto":
            dev = "cuda:0" if _cuda_count() else "cpu"
        return DevicePlan({"": _device(dev, source, "device")})
    if "gpu_split" in raw:
        layers = _split_by_capacity(raw["gpu_split"], n_layers, source)
    else:
        layers = _parse_layer_ranges(raw.get("layers"), n_layers, source)
    first, last = layers[0], layers[-1]
    prefixes = {f"model.layers.{i}": dev for i, dev in enumerate(layers)}
    prefixes["model.embed_tokens"] = _device(raw.get("embed_tokens", first), source, "embed_tokens")
    prefixes["model.norm"] = _device(raw.get("norm", last), source, "norm")
    prefixes["lm_head"] = _device(raw.get("lm_head", last), source, "lm_head")
    return DevicePlan(prefixes)


def _parse_layer_ranges(ranges, n_layers: int, source: str) -> list[str]:
    if not isinstance(ranges, dict) or not ranges:
        raise UsageError(f"{source}: \"layers\" must be an object like {{\"0-15\": 0, \"16-31\": 1}}")
    out: list[str | None] = [None] * n_layers
    for span, dev in ranges.items():
        try:
            lo, _, hi = str(span).partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise UsageError(f"{source}: layer range {span!r} is not of the form \"A-B\"") from None
        if not 0 <= lo <= hi < n_layers:
            raise UsageError(f"{source}: layer range {span!r} is outside 0-{n_layers - 1} (the model has {n_layers} layers)")
        for i in range(lo, hi + 1):
            out[i] = _device(dev, source, f"layers {span}")
    missing = [i for i, d in enumerate(out) if d is None]
    if missing:
        raise UsageError(f"{source}: layers {missing[0]}..{missing[-1]} are not placed; cover 0-{n_layers - 1}")
    return out  # type: ignore[return-value]


def _gpu_split(caps, source: str) -> list[float]:
    if not isinstance(caps, list) or not caps or not all(isinstance(c, (int, float)) and c > 0 for c in caps):
        raise UsageError(f"{source}: \"gpu_split\" must be a list of positive GiB figures, one per GPU, like [20, 24]")
    return caps


def _split_by_capacity(caps, n_layers: int, source: str) -> list[str]:
    """Without a known footprint: layers in proportion to the GPUs' capacities."""
    caps = _gpu_split(caps, source)
    total = float(sum(caps))
    out, acc = [], 0.0
    for gpu, cap in enumerate(caps):
        acc += cap
        upto = round(n_layers * acc / total)
        out += [f"cuda:{gpu}"] * (upto - len(out))
    return out


def _device(v, source: str, key: str) -> str:
    if isinstance(v, bool):
        raise UsageError(f"{source}: {key}: device must be a GPU index, \"cuda:N\" or \"cpu\", not {v!r}")
    if isinstance(v, int) and v >= 0:
        return f"cuda:{v}"
    if isinstance(v, str) and (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
        return "cuda:0" if v == "cuda" else v
    if v == "disk":
        raise UsageError(f"{source}: {key}: \"disk\" offload is not supported; use \"cpu\" for layers that don't fit")
    raise UsageError(f"{source}: {key}: device must be a GPU index, \"cuda:N\" or \"cpu\", not {v!r}")


def map_may_use_gpu(raw: dict) -> bool:
    """Whether a raw map (either form) can place anything on a GPU of this machine."""
    if not _cuda_count():
        return False
    values = [v for k, v in raw.items() if k != "layers"] + list((raw.get("layers") or {}).values())
    return any(v != "cpu" for v in values)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_available(plan: DevicePlan, source: str) -> None:
    n = _cuda_count()
    for dev in plan.devices:
        if dev.startswith("cuda") and int(dev.split(":")[1]) >= n:
            have = f"only {n} GPU(s)" if n else "no CUDA GPU"
            raise TalisError(f"{source} places layers on {dev} but this machine has {have}; use --device-map cpu or a map for the GPUs you have")
