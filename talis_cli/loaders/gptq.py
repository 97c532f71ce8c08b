"""GPTQ safetensors as AutoGPTQ and GPTQ-for-LLaMa write them: settings from the folder's own files."""

from __future__ import annotations

from pathlib import Path

from quant_kernels.gptq_format import SUPPORTED_BITS, valid_group_size

from ..errors import TalisError
from ..json_files import read_json_object
from . import register_loader
from .base import Loader, LoadRequest, QuantSettings, has_qweights
from .tensor_files import read_header, stream_safetensors, weight_files

SUPPORTED_FORMATS = ("gptq", "gptq_v2")


def read_quantize_config(folder: Path) -> tuple[dict, Path] | None:
    """quantize_config.json, quant_config.json, then config.json["quantization_config"] (quant_method gptq)."""
    for name in ("quantize_config.json", "quant_config.json"):
        path = folder / name
        if path.exists():
            return read_json_object(path), path
    path = folder / "config.json"
    if path.exists():
        qc = read_json_object(path).get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method", "gptq") == "gptq":
            return qc, path
    return None


def settings_from(qc: dict, source: Path, wbits: int | None, groupsize: int | None) -> QuantSettings:
    """Validate a quantize config and check the user's --wbits / --groupsize against it."""
    try:
        bits, group = int(qc.get("bits", wbits or 4)), int(qc.get("group_size", groupsize or -1))
    except (TypeError, ValueError):
        raise TalisError(f"{source}: bits and group_size must be integers") from None
    fmt = qc.get("checkpoint_format", "gptq")
    if bits not in SUPPORTED_BITS:
        raise TalisError(f"{source}: bits {bits} is not supported; talis reads {', '.join(map(str, SUPPORTED_BITS))}-bit GPTQ")
    if not valid_group_size(group):
        raise TalisError(f"{source}: group_size {group} must be a power of two or -1")
    if fmt not in SUPPORTED_FORMATS:
        raise TalisError(f"{source}: checkpoint_format {fmt!r} is not supported; talis reads {', '.join(SUPPORTED_FORMATS)}")
    if wbits is not None and wbits != bits:
        raise TalisError(f"--wbits {wbits} contradicts {source.name} (bits {bits}); drop the flag or fix the file")
    if groupsize is not None and groupsize != group:
        raise TalisError(f"--groupsize {groupsize} contradicts {source.name} (group_size {group}); drop the flag or fix the file")
    return QuantSettings(bits, group, bool(qc.get("desc_act", False)), bool(qc.get("sym", True)), fmt)


class SafetensorsFolderLoader(Loader):
    """Shared by the loaders that read the weights of a folder (one file or shards)."""

    base_name: str | None = None

    def files(self) -> list[Path]:
        if not hasattr(self, "_files"):
            self._files = weight_files(self.folder, self.base_name)
        return self._files

    def tensor_shapes(self) -> dict[str, list[int]]:
        if not hasattr(self, "_shapes"):  # asked by the planner and by load: read the headers once
            self._shapes = {}
            for f in self.files():
                self._shapes.update({k: shape for k, (_, shape) in read_header(f).items()})
        return self._shapes

    def tensors(self):
        for f in self.files():
            yield from stream_safetensors(f)


@register_loader
class GPTQLoader(SafetensorsFolderLoader):
    name = "gptq"
    priority = 20

    @classmethod
    def detect(cls, request: LoadRequest) -> bool:
        return request.checkpoint is None and read_quantize_config(request.model_dir) is not None

    def __init__(self, request: LoadRequest):
        super().__init__(request)
        found = read_quantize_config(self.folder)
        if found is None:
            raise TalisError(f"{self.folder}: no quantize_config.json, quant_config.json or quantization_config in config.json")
        self.qc, self.qc_path = found
        self.base_name = self.qc.get("model_file_base_name")

    def quant_settings(self, shapes):
        if not has_qweights(shapes):
            raise TalisError(f"{self.folder}: {self.qc_path.name} says GPTQ but the weights hold no qweight tensors")
        return settings_from(self.qc, self.qc_path, self.request.wbits, self.request.groupsize)
