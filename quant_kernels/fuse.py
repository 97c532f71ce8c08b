"""Fuse linears that read the same input into one wider layer: q/k/v and gate/up.

One launch over the concatenated weight reads the input once and, at batch 1, replaces three (or two) small
GEMVs that cannot fill the GPU by one that can. The fused output is the parts' outputs side by side along the
last dim, in the order given. Layers fuse only when they agree on input size, bits, group size, zero offset,
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
        and not p.source_released  # its backend holds the weight; the GPTQ tensors (g_idx too) are gone
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


def fuse_quant(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output is the parts' outputs concatenated; the parts must be `_quant_compatible`.

    qweight and scales concatenate along the output dim as they are; qzeros are packed along the output dim, so
    they are unpacked, concatenated and repacked (a part's width need not fill whole words).
    """
    first = parts[0]
    bits = first.bits
    zeros = torch.cat([gptq_format.unpack_cols(p.qzeros, bits, p.out_features) for p in parts], dim=1)
    bias = torch.cat([p.bias for p in parts]) if first.bias is not None else None
    fused = QuantLinear.from_quantized(
        torch.cat([p.qweight for p in parts], dim=1), gptq_format.pack_cols(zeros, bits),
        torch.cat([p.scales for p in parts], dim=1), first.g_idx, bits, first.group_size, first.zero_offset, bias,
    )
    fused.set_backend(first.backend_name)
    return fused


def fuse_dense(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the parts' outputs concatenated; the parts must be `_dense_compatible`."""
    first = parts[0]
    out_features = sum(p.out_features for p in parts)
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """The fused layer, or None when the parts cannot be fused (then they stay as they are)."""
    if _quant_compatible(parts):
        return fuse_quant(parts)
    if _dense_compatible(parts):
        return fuse_dense(parts)
    return None


def fuse_model(model: nn.Module) -> int:
    """Fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` in every layer that allows it; returns how many
    fused layers were made. The separate layers are removed, so their memory is freed as the model goes."""
    groups = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
              "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
    made = 0
    for layer in model.model.layers:
        for owner_name, (fused_name, part_names) in groups.items():
            owner = getattr(layer, owner_name)
            if getattr(owner, fused_name, None) is not None:
                continue
            fused = fuse_linears([getattr(owner, n) for n in part_names])
            if fused is None:
                continue
            for n in part_names:
                delattr(owner, n)
                setattr(owner, n, None)
            setattr(owner, fused_name, fused)
            made += 1
    return made
