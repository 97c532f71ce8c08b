"""Plain fp16/bf16/fp32 safetensors: run unquantized, or round-to-nearest quantize on load."""

from __future__ import annotations

from ..errors import TalisError
from . import register_loader
from .base import LoadRequest
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
        if any(k.endswith(".qweight") for k in shapes):
            raise TalisError(f"{self.folder}: the weights are GPTQ but there is no quantize_config.json; pass --checkpoint FILE --wbits N --groupsize G")
        if self.request.wbits is not None and self.request.quantize_bits is None:
            raise TalisError(f"{self.folder}: --wbits was given but the weights are not quantized; drop it, or quantize with `talis quantize`")
        return None

    def finish(self, model, args) -> None:
        if self.request.quantize_bits:
            quantize_linears_rtn(model, self.request.quantize_bits, self.request.groupsize or 128)


def quantize_linears_rtn(model, bits: int, group_size: int) -> None:
    """Replace every decoder linear (not lm_head) by its round-to-nearest GPTQ-format quantization."""
    from torch import nn

    from quant_kernels.gptq import rtn_quantize
    from quant_kernels.quant_linear import QuantLinear

    for name, module in list(model.model.named_modules()):
        if isinstance(module, nn.Linear):
            q = rtn_quantize(module.weight.data.float(), bits, group_size, sym=True)
            layer = QuantLinear.from_quantized(q.qweight, q.qzeros, q.scales.to(module.weight.dtype), q.g_idx, bits, group_size,
                                               bias=module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.model.get_submodule(parent), attr, layer.to(module.weight.device))
