"""Quantization of one weight matrix: round-to-nearest (RTN) and GPTQ (Frantar et al., 2022).

Both work on W [out, in] in nn.Linear orientation and return `PackedWeight`: the GPTQ tensors in the standard
v1 layout ("gptq" checkpoint format, stored zero = zero - 1), ready for `QuantLinear.from_quantized` and for a
safetensors file.
"""

import math
from dataclasses import dataclass

import torch

from quant_kernels import gptq_format

_MIN_SCALE = torch.finfo(torch.float16).tiny  # scales are stored in fp16: keep them normal numbers
_V1_ZERO_OFFSET = 1


@dataclass
class PackedWeight:
    """GPTQ tensors of one linear layer (in = input features, out = output features, G = groups)."""

    qweight: torch.Tensor  # (in*bits/32, out) int32
    qzeros: torch.Tensor  # (G, out*bits/32) int32, zero - 1
    scales: torch.Tensor  # (G, out) fp16
    g_idx: torch.Tensor  # (in,) int32, group of each input row
    bits: int
    group_size: int

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by their checkpoint names (`<module>.qweight` etc. without the prefix)."""
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def dequantize(self) -> torch.Tensor:
        """The weight these tensors stand for, [out, in] float32."""
        return gptq_format.dequantize(self.qweight, self.qzeros, self.scales.float(), self.g_idx, self.bits,
                                      _V1_ZERO_OFFSET).t()


def _check_settings(bits: int, group_size: int) -> None:
    if bits not in gptq_format.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {gptq_format.SUPPORTED_BITS}, got {bits}")
    if not gptq_format.valid_group_size(group_size):
        raise ValueError(f"group_size must be a power of two or -1, got {group_size}")


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero for the values of w [rows, cols] (float32).

    The range always includes 0. Symmetric: zero = (maxq+1)/2 and the range is +-max|w|. Asymmetric: zero is
    kept >= 1 so that v1 files (which store zero - 1) never need -1; rows whose minimum is 0 stretch the scale.
    Scales are rounded to fp16, the precision they are stored in, so the quantization matches the file.
    Returns scale float32 [rows], zero float32 [rows] (integer valued).
    """
    maxq = 2**bits - 1
    low = w.min(dim=1).values.clamp(max=0)
    high = w.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(-low, high)
        low = -high
    empty = (low == 0) & (high == 0)  # all-zero rows: any scale works, avoid dividing by zero
    low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
    scale = (high - low) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-low / scale)
        stretched = zero < 1
        scale = torch.where(stretched, high / (maxq - 1), scale)
        zero = zero.clamp(min=1)
    return scale.clamp(min=_MIN_SCALE).half().float(), zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w [rows, ...] given per-row scale/zero [rows] (broadcast over the trailing dims)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, 2**bits - 1)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
         group_size: int) -> PackedWeight:
    """Pack integer codes q [out, in], scales/zeros [G, out] and g_idx [in] into the v1 layout."""
    return PackedWeight(
        qweight=gptq_format.pack_rows(q.t().to(torch.int32), bits),
        qzeros=gptq_format.pack_cols(zeros.to(torch.int32) - _V1_ZERO_OFFSET, bits),
        scales=scales.half(),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> PackedWeight:
    """Round-to-nearest quantization of weight [out, in], groups of `group_size` consecutive inputs (-1: one)."""
    _check_settings(bits, group_size)
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    n_groups = gptq_format.num_groups(in_features, group_size)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, n_groups * size - in_features))  # zeros do not move a range holding 0
    grouped = padded.reshape(out_features * n_groups, size)
    scale, zero = find_params(grouped, bits, sym)
    q = quantize_values(grouped, scale, zero, bits).reshape(out_features, -1)[:, :in_features]
    g_idx = gptq_format.default_g_idx(in_features, group_size, weight.device)
    return pack(q, scale.reshape(out_features, n_groups).t(), zero.reshape(out_features, n_groups).t(), g_idx,
                bits, group_size)


class GPTQ:
    """GPTQ for one linear layer: feed calibration inputs with `add_batch`, then `quantize`.

    weight: [out, in] (nn.Linear orientation); the Hessian is accumulated in float32 on weight's device.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        in_features = weight.shape[1]
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=weight.device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [..., in] activations entering the layer; keeps H = 2 X^T X / n over all rows seen so far."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        self.hessian *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.hessian += x.t() @ x

    def quantize(self, bits: int, group_size: int, sym: bool = True, act_order: bool = False,
                 damp_percent: float = 0.01, block_size: int = 128, static_groups: bool = False) -> PackedWeight:
        """Quantize the weight column by column, each error spread over the columns not yet quantized.

        act_order: quantize inputs by decreasing Hessian diagonal (g_idx then records each row's group).
        static_groups: with act_order, fix every group's scale/zero from the original weight beforehand.
        """
        _check_settings(bits, group_size)
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize needs calibration inputs: call add_batch first")
        w = self.weight.to(self.hessian.device, torch.float32).clone()
        out_features, in_features = w.shape
        h = self.hessian.clone()
        dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
        h[dead, dead] = 1
        w[:, dead] = 0

        size = in_features if group_size == -1 else group_size
        n_groups = gptq_format.num_groups(in_features, group_size)
        scales = torch.zeros(n_groups, out_features, device=w.device)
        zeros = torch.zeros_like(scales)
        if static_groups or group_size == -1:
            for g in range(n_groups):
                scales[g], zeros[g] = find_params(w[:, g * size:(g + 1) * size], bits, sym)

        perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features,
                                                                                             device=w.device)
        w, h = w[:, perm], h[perm][:, perm]
        # Group of each position in quantization order: static groups follow the original rows, dynamic groups
        # are formed in quantization order.
        position_group = perm // size if static_groups else torch.arange(in_features, device=w.device) // size

        group_of_column = position_group.tolist()  # read on the host once, not synced column by column
        h_inv = self._inverse_hessian_factor(h, damp_percent)
        q = torch.zeros_like(w)
        block_size = -(-block_size // size) * size if group_size != -1 else block_size  # groups never straddle
        for start in range(0, in_features, block_size):
            stop = min(start + block_size, in_features)
            block = w[:, start:stop].clone()
            errors = torch.zeros_like(block)
            h_inv_block = h_inv[start:stop, start:stop]
            for i in range(stop - start):
                col = start + i
                if group_size != -1 and not static_groups and col % size == 0:
                    g = col // size
                    scales[g], zeros[g] = find_params(block[:, i:i + size], bits, sym)
                g = group_of_column[col]
                q[:, col] = quantize_values(block[:, i], scales[g], zeros[g], bits)
                dequantized = scales[g] * (q[:, col] - zeros[g])
                err = (block[:, i] - dequantized) / h_inv_block[i, i]
                block[:, i:] -= err[:, None] * h_inv_block[i, i:][None, :]
                errors[:, i] = err
            w[:, stop:] -= errors @ h_inv[start:stop, stop:]  # the lazy batch update of later columns

        inverse = torch.argsort(perm)
        g_idx = position_group[inverse].to(torch.int32)
        return pack(q[:, inverse], scales, zeros, g_idx, bits, group_size)

    @staticmethod
    def _inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
        """Upper Cholesky factor of the inverse of the damped Hessian h [in, in]."""
        damp = damp_percent * torch.mean(torch.diag(h))
        h = h + damp * torch.eye(h.shape[0], device=h.device)
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(h_inv, upper=True)
