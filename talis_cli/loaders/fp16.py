"""Plain fp16/bf16/fp32 safetensors: run unquantized, or round-to-nearest quantize on load (--wbits)."""

from __future__ import annotations

from ..errors import TalisError
from . import register_loader
from .base import LoadRequest, has_qweights, replace_module
from .gptq import SafetensorsFolderLoader
from .tensor_files import PICKLE_SUFFIXES


@register_loader
class Fp16Loader(SafetensorsFolderLoader):
    name = "fp16"
    priority = 10

    @classmethod
    def detect(cls, request: LoadRequest) -> bool:
        folder = request.model_dir
        return request.checkpoint is None and (any(folder.glob("*.safetensors")) or any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()))

    def quant_settings(self, shapes):
        if has_qweights(shapes):
            raise TalisError(f"{self.folder}: the weights are GPTQ but there is no quantize_config.json; pass --checkpoint FILE --wbits N --groupsize G")
        return None

    def finish(self, model, args) -> None:
        """With --wbits, round-to-nearest quantize the fp16 weights now (group size --groupsize, default 128)."""
        if self.request.wbits is not None:
            quantize_linears_rtn(model, self.request.wbits, self.request.groupsize or 128)


def quantize_linears_rtn(model, bits: int, group_size: int) -> None:
    """Replace every decoder linear (not lm_head) by its round-to-nearest GPTQ-format quantization."""
    from quant_kernels.quant_linear import QuantLinear

    from ..quantize import rtn_layers

    for name, packed in rtn_layers(model, bits, group_size).items():
        old = model.get_submodule(name)
        layer = QuantLinear.from_quantized(packed.qweight, packed.qzeros, packed.scales.to(old.weight.dtype),
                                           packed.g_idx, bits, group_size, bias=old.bias)
        replace_module(model, name, layer.to(old.weight.device))
