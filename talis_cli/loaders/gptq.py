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
FORMAT_KEYS = ("format", "checkpoint_format")  # GPTQModel's primary key, then the legacy one


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


def settings_from(qc: dict, source: Path, wbits: int | None, groupsize: int | None,
                  shapes: dict[str, list[int]] | None = None) -> QuantSettings:
    """Validate a quantize config (against the checkpoint's tensor `shapes` when given) and check the user's
    --wbits / --groupsize against it. Raises TalisError with one line naming the key at fault."""
    try:
        bits, group = int(qc.get("bits", wbits or 4)), int(qc.get("group_size", groupsize or -1))
    except (TypeError, ValueError):
        raise TalisError(f"{source}: bits and group_size must be integers") from None
    fmt = checkpoint_format(qc, source)
    if bits not in SUPPORTED_BITS:
        raise TalisError(f"{source}: bits {bits} is not supported; talis reads {', '.join(map(str, SUPPORTED_BITS))}-bit GPTQ")
    if not valid_group_size(group):
        raise TalisError(f"{source}: group_size {group} must be a power of two or -1")
    check_pack_dtype(qc, source)
    if shapes is not None:
        check_lm_head(qc, source, shapes)
    if wbits is not None and wbits != bits:
        raise TalisError(f"--wbits {wbits} contradicts {source.name} (bits {bits}); drop the flag or fix the file")
    if groupsize is not None and groupsize != group:
        raise TalisError(f"--groupsize {groupsize} contradicts {source.name} (group_size {group}); drop the flag or fix the file")
    return QuantSettings(bits, group, bool(qc.get("desc_act", False)), bool(qc.get("sym", True)), fmt)


def checkpoint_format(qc: dict, source: Path) -> str:
    """The weights' format from `format` (GPTQModel's key) or `checkpoint_format` (AutoGPTQ's, and transformers'
    legacy name): "gptq" (v1, the default) or "gptq_v2". The two libraries differ on which key wins, so a config
    whose keys disagree is refused rather than guessed."""
    given = {key: str(qc[key]).lower() for key in FORMAT_KEYS if qc.get(key) is not None}
    if len(set(given.values())) > 1:
        raise TalisError(f"{source}: format {given['format']!r} and checkpoint_format {given['checkpoint_format']!r} "
                         f"disagree; keep the one that describes the weights")
    key, fmt = next(iter(given.items()), ("format", "gptq"))
    if fmt not in SUPPORTED_FORMATS:
        raise TalisError(f"{source}: {key} {fmt!r} is not supported; talis reads {', '.join(SUPPORTED_FORMATS)}")
    return fmt


def check_pack_dtype(qc: dict, source: Path) -> None:
    """GPTQModel's `pack_dtype`: the integer type the codes are packed in; talis reads int32 words (the default)."""
    value = qc.get("pack_dtype")
    if value is not None and str(value).lower() not in ("int32", "torch.int32"):
        raise TalisError(f"{source}: pack_dtype {value!r} is not supported; "
                         f"talis reads GPTQ weights packed in int32 words")


def check_lm_head(qc: dict, source: Path, shapes: dict[str, list[int]]) -> None:
    """`lm_head: true` (GPTQModel, AutoGPTQ) says the head is quantized; the weights must agree, as those tools build
    the head from the config and then fail on the tensors. Without the key, the weights decide."""
    said = qc.get("lm_head")
    if said is None:
        return
    if not isinstance(said, bool):
        raise TalisError(f"{source}: lm_head must be true or false, not {said!r}")
    holds = "lm_head.qweight" in shapes
    if said and not holds:
        raise TalisError(f"{source}: lm_head is true but the weights hold no quantized lm_head (lm_head.qweight); "
                         f"the config and the weights don't belong together — set \"lm_head\": false if the head "
                         f"is fp16")
    if holds and not said:
        raise TalisError(f"{source}: lm_head is false but the weights hold a quantized lm_head (lm_head.qweight); "
                         f"the config and the weights don't belong together — set \"lm_head\": true if they do")


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
        return settings_from(self.qc, self.qc_path, self.request.wbits, self.request.groupsize, shapes)
