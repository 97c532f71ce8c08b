"""The loading pipeline every loader shares: config -> model on the meta device -> quantized linears swapped
in -> tensors streamed one by one onto their devices -> checks.

A loader subclass says which folders it handles (`detect`), which quantization the weights use
(`quant_settings`) and which tensors there are (`tensor_shapes`, `tensors`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..config import ModelArgs
from ..errors import TalisError
from ..json_files import read_json_object
from ..placement import DevicePlan

Progress = Callable[[int, int, str], None]  # (done, total, message)

# Tensors some exporters write that our model computes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class QuantSettings:
    bits: int
    group_size: int  # -1: one group over all input rows
    desc_act: bool = False  # act-order: g_idx is not monotone
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" stores zero - 1, "gptq_v2" the zero itself

    @property
    def zero_offset(self) -> int:
        from quant_kernels.gptq_format import zero_offset_for

        return zero_offset_for(self.checkpoint_format)


@dataclass
class LoadRequest:
    model_dir: Path
    plan: DevicePlan
    checkpoint: Path | None = None  # a weights file apart from the model folder (the original project's style)
    wbits: int | None = None  # bits given by the user; must agree with the checkpoint
    groupsize: int | None = None
    allow_pickle: bool = False
    dtype: object = None  # torch dtype; default fp16 on GPU, fp32 on CPU
    shard: object = None  # tensor parallel: this rank's tensor_parallel.shard.Shard (its slice of every layer)


@dataclass
class LoadedModel:
    model: object  # talis_cli.model.Transformer
    args: ModelArgs
    quant: QuantSettings | None
    files: list[Path] = field(default_factory=list)
    loader: str = ""


class Loader:
    """Base class; subclasses register with `talis_cli.loaders.register_loader`."""

    name = "base"
    priority = 0  # higher is tried first

    def __init__(self, request: LoadRequest):
        self.request = request
        self.folder = request.model_dir

    @classmethod
    def detect(cls, request: LoadRequest) -> bool:
        raise NotImplementedError

    def files(self) -> list[Path]:
        raise NotImplementedError

    def tensor_shapes(self) -> dict[str, list[int]]:
        raise NotImplementedError

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        raise NotImplementedError

    def quant_settings(self, shapes: dict[str, list[int]]) -> QuantSettings | None:
        return None

    def finish(self, model, args: ModelArgs) -> None:
        """A hook after all tensors are in place (e.g. quantize on load)."""

    # --- the shared pipeline -----------------------------------------------------------------------
    def load(self, progress: Progress | None = None) -> LoadedModel:
        import torch

        from ..model import Transformer

        args = read_model_args(self.folder)
        shapes = self.tensor_shapes()
        quant = self.quant_settings(shapes)
        dtype = self.request.dtype or (torch.float16 if self.request.plan.uses_cuda else torch.float32)
        shard = self.request.shard.with_quant(quant) if self.request.shard is not None else None
        with torch.device("meta"), skip_weight_init():
            model = Transformer(shard.local_args(args) if shard else args)  # a rank's 1/N of every layer
        if quant is not None:
            swap_quantized_linears(model, shapes, quant, dtype)
        if shard:
            shard.prepare(model, args)
        self._fill(model, shapes, dtype, progress, shard)
        finish_tied_and_defaults(model, args)
        self.finish(model, args)
        check_all_loaded(model, self.folder)
        model.eval()
        return LoadedModel(model, args, quant, self.files(), self.name)

    def _fill(self, model, shapes: dict[str, list[int]], dtype, progress: Progress | None, shard=None) -> None:
        total, done = len(shapes), 0
        for name, tensor in self.tensors():
            done += 1
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if shard is not None:
                tensor = shard.tensor(name, tensor)
            assign_tensor(model, name, tensor, self.request.plan.device_for(name), dtype, self.folder)
            if progress and (done % 16 == 0 or done == total):
                progress(done, total, name)


@contextlib.contextmanager
def skip_weight_init():
    """Build modules without random init: the checkpoint provides every weight, and initializing even meta
    tensors costs ~2 s of one-time torch imports on a small CPU."""
    from torch import nn

    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def read_model_args(folder: Path) -> ModelArgs:
    path = folder / "config.json"
    if not path.exists():
        raise TalisError(f"{folder}: no config.json; a model folder needs config.json, the tokenizer files and the weights")
    return ModelArgs.from_hf_config(read_json_object(path), str(path))


def swap_quantized_linears(model, shapes: dict[str, list[int]], quant: QuantSettings, dtype) -> None:
    """Replace every nn.Linear whose checkpoint holds a `qweight` by a QuantLinear (on the meta device)."""
    from torch import nn

    from quant_kernels.quant_linear import QuantLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in shapes:
            q = QuantLinear(module.in_features, module.out_features, quant.bits, quant.group_size,
                            bias=module.bias is not None, zero_offset=quant.zero_offset, dtype=dtype, device="meta")
            replace_module(model, name, q)


def replace_module(model, name: str, new) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def has_qweights(shapes: dict[str, list[int]]) -> bool:
    return any(k.endswith(".qweight") for k in shapes)


def assign_tensor(model, name: str, tensor, device: str, dtype, source: Path) -> None:
    """Put one checkpoint tensor into the model on `device`, checking its shape; floats become `dtype`."""
    import torch
    from torch import nn

    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    current = getattr(module, attr, None) if module is not None else None
    if current is None:
        if attr == "bias" and not tensor.any():
            return  # some exporters write all-zero biases for layers that have none
        raise TalisError(f"{source}: the checkpoint has tensor {name!r}, which this model does not have; does config.json belong to these weights?")
    if list(tensor.shape) != list(current.shape):
        raise TalisError(shape_mismatch_message(source, name, list(tensor.shape), list(current.shape), module))
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.to(device)
    if isinstance(current, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        module._buffers[attr] = tensor if attr != "g_idx" else tensor.to(torch.int32)


def shape_mismatch_message(source: Path, name: str, got: list[int], want: list[int], module) -> str:
    bits = getattr(module, "bits", None)
    if bits is not None and name.endswith(".qweight") and got[1:] == want[1:] and got[0] * 32 % module.in_features == 0:
        return (f"{source}: {name} holds {got[0] * 32 // module.in_features}-bit weights but the settings say {bits}-bit; "
                f"fix --wbits or the quantize config")
    if bits is not None and name.endswith((".scales", ".qzeros")) and got[0] != want[0]:
        return (f"{source}: {name} has {got[0]} groups but group size {module.group_size} gives {want[0]}; "
                f"fix --groupsize or the quantize config")
    return f"{source}: tensor {name} has shape {got} but config.json implies {want}; the weights and config.json don't belong together"


def finish_tied_and_defaults(model, args: ModelArgs) -> None:
    """Tie an fp16 lm_head to the embeddings when the checkpoint has no lm_head; give old GPTQ files their g_idx.

    A quantized lm_head (`lm_head.qweight`, GPTQModel/AutoGPTQ `lm_head: true`) is its own layer even when
    config.json ties the embeddings: the embedding stays fp16 and the head computes from its GPTQ tensors.
    """
    from torch import nn

    from quant_kernels.gptq_format import default_g_idx
    from quant_kernels.quant_linear import QuantLinear

    head = model.lm_head
    if isinstance(head, nn.Linear) and head.weight.is_meta and args.tie_word_embeddings:
        head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.g_idx.is_meta:
            module.g_idx = default_g_idx(module.in_features, module.group_size, module.qweight.device)


def check_all_loaded(model, source: Path) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise TalisError(f"{source}: the checkpoint has no tensor {name!r}; the weights are incomplete or belong to another model")
