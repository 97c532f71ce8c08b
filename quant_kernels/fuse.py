"""Fuse linears that read the same input into one wider layer: q/k/v and gate/up.

One launch over the concatenated weight reads the input once and, at batch 1, replaces three (or two) small
GEMVs that cannot fill the GPU by one that can. The fused output is the parts' outputs side by side along the
last dim, in the order given, or with `interleave` (parts of equal width) column by column: gate/up fuse as
gate 0, up 0, gate 1, up 1, ... so that one GEMV program holds both inputs of each silu(gate) * up and can
finish the SwiGLU itself (triton_backend.forward_swiglu). Layers fuse only when they agree on input size, bits, group size, zero offset,
g_idx and dtype (GPTQ files quantize q/k/v with one Hessian, so act-order g_idx agree in practice); plain
nn.Linear layers fuse when their dtype, device and bias presence agree.
"""
from __future__ import annotations

import torch
from torch import nn

from . import gptq_format
from .quant_linear import QuantLinear


def _quant_compatible(parts: list[QuantLinear]) -> bool:
    first = parts[0]
    same = ("in_features", "bits", "group_size", "zero_offset")
    return all(
        isinstance(p, QuantLinear)
        and all(getattr(p, a) == getattr(first, a) for a in same)
        and p.scales.dtype == first.scales.dtype
        and p.qweight.device == first.qweight.device
        and (p.bias is None) == (first.bias is None)
        and torch.equal(p.g_idx, first.g_idx)
        for p in parts
    )


def _dense_compatible(parts: list[nn.Linear]) -> bool:
    first = parts[0]
    return all(
        type(p) is nn.Linear
        and p.in_features == first.in_features
        and p.weight.dtype == first.weight.dtype
        and p.weight.device == first.weight.device
        and (p.bias is None) == (first.bias is None)
        for p in parts
    )


def _column_order(parts: list[nn.Module], interleave: bool) -> torch.Tensor | None:
    """Which concatenated output column goes where in the fused output (None: as concatenated)."""
    if not interleave:
        return None
    width = parts[0].out_features
    assert all(p.out_features == width for p in parts), "interleaved parts must be of equal width"
    return torch.arange(width * len(parts)).view(len(parts), width).T.flatten()


def _cat_columns(tensors: list[torch.Tensor], order: torch.Tensor | None, dim: int) -> torch.Tensor:
    fused = torch.cat(tensors, dim=dim)
    return fused if order is None else fused.index_select(dim, order.to(fused.device)).contiguous()


def fuse_quant(parts: list[QuantLinear], interleave: bool = False) -> QuantLinear:
    """One fused QuantLinear (see the module docstring); the parts must be `_quant_compatible`.

    qweight and scales are joined along the output dim as they are; qzeros are packed along the output dim, so
    they are unpacked, joined and repacked (a part's width need not fill whole words).
    """
    first = parts[0]
    bits = first.bits
    order = _column_order(parts, interleave)
    zeros = _cat_columns([gptq_format.unpack_cols(p.qzeros, bits, p.out_features) for p in parts], order, 1)
    bias = _cat_columns([p.bias for p in parts], order, 0) if first.bias is not None else None
    fused = QuantLinear.from_quantized(
        _cat_columns([p.qweight for p in parts], order, 1), gptq_format.pack_cols(zeros, bits),
        _cat_columns([p.scales for p in parts], order, 1), first.g_idx, bits, first.group_size, first.zero_offset,
        bias,
    )
    fused.set_backend(first.backend_name)
    return fused


def fuse_dense(parts: list[nn.Linear], interleave: bool = False) -> nn.Linear:
    """One fused nn.Linear (see the module docstring); the parts must be `_dense_compatible`."""
    first = parts[0]
    order = _column_order(parts, interleave)
    out_features = sum(p.out_features for p in parts)
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(_cat_columns([p.weight for p in parts], order, 0), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(_cat_columns([p.bias for p in parts], order, 0), requires_grad=False)
    return fused


def fuse_linears(parts: list[nn.Module], interleave: bool = False) -> nn.Module | None:
    """The fused layer, or None when the parts cannot be fused (then they stay as they are)."""
    if interleave and len({p.out_features for p in parts}) != 1:
        return None
    if _quant_compatible(parts):
        return fuse_quant(parts, interleave)
    if _dense_compatible(parts):
        return fuse_dense(parts, interleave)
    return None


def fuse_model(model: nn.Module) -> int:
    """Fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` in every layer that allows it; returns how many
    fused layers were made. The separate layers are removed, so their memory is freed as the model goes."""
    groups = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj"), False),
              "mlp": ("gate_up_proj", ("gate_proj", "up_proj"), True)}
    made = 0
    for layer in model.model.layers:
        for owner_name, (fused_name, part_names, interleave) in groups.items():
            owner = getattr(layer, owner_name)
            if getattr(owner, fused_name, None) is not None:
                continue
            fused = fuse_linears([getattr(owner, n) for n in part_names], interleave)
            if fused is None:
                continue
            for n in part_names:
                delattr(owner, n)
                setattr(owner, n, None)
            setattr(owner, fused_name, fused)
            made += 1
    return made
