"""Planning where layers go from how many bytes each needs and how many each device may hold.

Each layer needs its weights plus its share of the KV cache for the chosen context; every device also keeps
a reserve for activations and workspace. Devices fill in the order given (GPUs first, then "cpu" as the
slow fallback for whole layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TalisError, UsageError

GiB = 1 << 30
INT32_SUFFIXES = (".qweight", ".qzeros", ".g_idx")
# A quantized layer's scales as the GPU kernels hold them: one 32-bit word per group and column, the fp16 scale and
# the fp16 zero point (triton_backend.PreparedWeight.scale_zero), 4 bytes where the checkpoint's fp16 scales take 2
# (65B: the words take 0.76 GB more than the checkpoint's scales and zeros, talis_cli.memory_breakdown; the plan
# also keeps counting the zeros, which the Triton backend frees: 0.25 GB over).
SCALE_WORD_BYTES = 4
ACTIVATION_RESERVE = 1 * GiB  # per GPU: activations, logits, CUDA graphs and allocator slack


@dataclass
class Footprint:
    """Bytes each part of a model needs on its device."""

    embed: int
    layers: list[int]  # weights + KV cache, per decoder layer
    head: int  # final norm + lm_head

    @property
    def total(self) -> int:
        return self.embed + sum(self.layers) + self.head


def footprint(shapes: dict[str, list[int]], n_layers: int, kv_bytes_per_layer: int, float_bytes: int) -> Footprint:
    """From checkpoint tensor shapes: int32 tensors keep 4 bytes a value, a quantized layer's scales
    SCALE_WORD_BYTES (its zero points are counted too, as the torch backend keeps them), other floats
    `float_bytes`."""
    embed, head, layers = 0, 0, [kv_bytes_per_layer] * n_layers
    for name, shape in shapes.items():
        count = 1
        for d in shape:
            count *= d
        if name.endswith(INT32_SUFFIXES):
            size = count * 4
        elif name.endswith(".scales"):
            size = count * max(SCALE_WORD_BYTES, float_bytes)
        else:
            size = count * float_bytes
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) < n_layers:
            layers[int(m.group(1))] += size
        elif name.startswith("model.embed_tokens"):
            embed += size
        else:
            head += size
    if head == 0:  # tied lm_head: the embedding is needed on the last device too
        head = embed
    return Footprint(embed, layers, head)


def reserve(device: str) -> int:
    """Bytes kept free on a device for what is not weights or cache (GPUs only)."""
    return ACTIVATION_RESERVE if device.startswith("cuda") else 0


def parse_max_memory(text: str) -> dict[str, int]:
    """'0=22GiB,1=24GiB,cpu=32GiB' -> {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes} (order kept)."""
    caps = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB)?\s*", value)
        if not sep or not m or not (key.strip().isdigit() or key.strip() == "cpu"):
            raise UsageError(f"--max-memory: {part!r} is not DEVICE=SIZE (like 0=22GiB,1=24GiB,cpu=32GiB)")
        unit = {"GiB": GiB, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6, None: GiB}[m.group(2)]
        key = key.strip()
        caps["cpu" if key == "cpu" else f"cuda:{key}"] = int(float(m.group(1)) * unit)
    if not caps:
        raise UsageError("--max-memory is empty; give sizes like 0=22GiB,1=24GiB")
    return caps


def plan_by_capacity(fp: Footprint, caps: dict[str, int]) -> dict[str, str]:
    """Module prefixes -> device, filling devices in order; a clear error when the model does not fit."""
    devices = list(caps)
    room = {d: caps[d] - reserve(d) for d in devices}
    plan: dict[str, str] = {}
    i = 0

    def place(prefix: str, size: int) -> None:
        nonlocal i
        while i < len(devices) and size > room[devices[i]]:
            i += 1  # this device is full: the rest goes to the next one
        if i == len(devices):
            missing = fp.total - sum(max(caps[d] - reserve(d), 0) for d in devices)
            raise TalisError(
                f"the model does not fit: it needs {fp.total / GiB:.1f} GiB (weights + KV cache) and the devices give "
                f"{sum(caps.values()) / GiB:.1f} GiB less {ACTIVATION_RESERVE / GiB:.0f} GiB reserve per GPU; about "
                f"{max(missing, size) / GiB:.1f} GiB is missing — raise --max-memory, add a device (cpu=...), or lower --max-seq-len")
        room[devices[i]] -= size
        plan[prefix] = devices[i]

    place("model.embed_tokens", fp.embed)
    for n, size in enumerate(fp.layers):
        place(f"model.layers.{n}", size)
    place("lm_head", fp.head)
    plan["model.norm"] = plan["lm_head"]
    return plan


def available_memory() -> dict[str, int]:
    """Free bytes on every GPU now (the auto plan's capacities); "cpu" only when there is no GPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        return {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return {"cpu": _host_available()}


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: don't refuse


def check_fits(fp: Footprint, plan_prefixes: dict[str, str], caps: dict[str, int], source: str) -> None:
    """For explicit maps with known capacities: each device's share must fit its cap."""
    use: dict[str, int] = {}
    use[plan_prefixes.get("model.embed_tokens", "cpu")] = fp.embed
    for n, size in enumerate(fp.layers):
        dev = plan_prefixes[f"model.layers.{n}"]
        use[dev] = use.get(dev, 0) + size
    dev = plan_prefixes.get("lm_head", "cpu")
    use[dev] = use.get(dev, 0) + fp.head
    for dev, need in use.items():
        cap = caps.get(dev)
        if cap is not None and need + reserve(dev) > cap:
            raise TalisError(f"{source}: {dev} would need {need / GiB:.1f} GiB plus {ACTIVATION_RESERVE / GiB:.0f} GiB reserve "
                             f"but has {cap / GiB:.1f} GiB; move layers to another device or lower --max-seq-len")
