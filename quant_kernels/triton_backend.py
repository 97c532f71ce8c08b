"""The "triton" QuantLinear backend: fused GPTQ kernels on CUDA GPUs (or under TRITON_INTERPRET=1 on CPU).

`prepare` turns a layer into the layout the kernels read fastest:
- scales and zero points become one int32 word per group and column: the fp16 scale in the low half, the fp16
  full zero point (stored zero + offset, an exact small integer) in the high half. The kernels read it with the
  same wide loads as qweight and do no bit work per weight word for it.
- qweight is repacked so that rows 2p and 2p+1 of each word share one shift (`triton_gemv.word_slot`): the GEMV
  then unpacks two values per instruction. 3-bit values, which GPTQ packs across word boundaries, are repacked
  per unit of 32 rows into three words of eight 4-bit slots: the low 3 bits of a slot hold one value of rows
  0-23, the top bits of the three words' slots together hold the values of rows 24-31 (`pack_3bit_units`).
  Every value is then read from one word, no value straddles two, and the weight keeps its 3/8 byte per value.
- act-order: input rows are sorted by group once (the permutation kept), so each group's scales are read in one
  run; at run time the kernels read x through the permutation, or the producer of x writes it in that order
  (`input_gather`, used by the decode step).
The state is self-contained: `set_backend("triton", keep_source=False)` (what the engine does) frees the layer's
GPTQ tensors, so the weight is held once; otherwise the layer keeps both copies.
- anything the kernels do not cover (rows of a group not contiguous after sorting, K not a whole number of
  units (`triton_gemv.unit_rows`: 32 rows for 3 bits, 32 / bits otherwise) or groups smaller than one, scales
  not fp16, a CPU tensor outside the interpreter) falls back to the torch reference backend.

`forward` (`quantized_product`) routes by row count: from SKINNY_FROM_ROWS to SKINNY_TO_ROWS rows (a server's
decode batch, a short prompt) to the fused tensor-core kernel where it serves the layer (2-, 4-, 8-bit); otherwise
up to `triton_gemv.MAX_ROWS` rows to the fused GEMV and up to GEMV_PASSES * MAX_ROWS to GEMV passes of MAX_ROWS
rows; more rows (prefill, and 3-bit layers from 33 rows) are dequantized into a per-device fp16 scratch buffer, in
column slices, and multiplied by cuBLAS.
Measured on an H100 (BENCHMARKS.md, Kernels): at 2048 rows dequantize + cuBLAS ran at 550-630 TFLOP/s, 85-90% of
fp16 cuBLAS, while the fused Triton GEMM (`triton_gemm.quant_gemm`) reached only ~155 TFLOP/s; on an H200
(2026-12-01) the fused GEMM was slower than dequantize + cuBLAS at every M from 16 to 2048.
"""
import os
from dataclasses import dataclass

import torch

from . import gptq_format
from .autotune_cache import interpreting
from .quant_linear import QuantLinear, TorchBackend, register_backend
from .triton_gemm import dequantize_into
from .triton_gemv import MAX_ROWS, Workspace, gemv_workspace_size, quant_gemv, slot_bits, unit_rows, word_slot
from .triton_skinny import MAX_SKINNY_ROWS, quant_skinny, skinny_workspace_size, usable as skinny_usable

TRITON_BITS = (2, 3, 4, 8)


@dataclass
class PreparedWeight:
    """Tensors in kernel layout. qweight: int32 [K*bits/32, N] (`triton_gemv._gemv_kernel` describes it), rows
    sorted by group when `perm` is set;
    scale_zero: int32 [n_groups, N], fp16 scale (low half) and fp16 full zero point (high half);
    perm: int32 [K] or None, row k of qweight multiplies input feature perm[k]; groups of 2**group_shift rows."""

    qweight: torch.Tensor
    scale_zero: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_shift: int

    def args(self) -> tuple:
        return (self.qweight, self.scale_zero, self.perm, self.bits, self.group_shift)


def unsupported_reason(layer: QuantLinear) -> str | None:
    """Why the Triton kernels cannot run this layer, or None when they can."""
    if layer.bits not in TRITON_BITS:
        return f"{layer.bits}-bit weights"
    if layer.scales.dtype != torch.float16:
        return f"{layer.scales.dtype} scales"
    if layer.qweight.device.type != "cuda" and not interpreting():
        return f"tensors on {layer.qweight.device.type}"
    rows = unit_rows(layer.bits)  # held by whole int32 words
    if layer.in_features % rows:
        return f"in_features not a multiple of {rows} ({layer.bits}-bit values in whole int32 words)"
    if layer.group_size != -1 and layer.group_size < rows:
        return f"groups smaller than {rows} rows ({layer.bits}-bit values in whole int32 words)"
    return None


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The row permutation that makes each group contiguous, None when g_idx is already in order.

    Raises ValueError when sorting cannot give `group_size` consecutive rows per group (what the kernels assume).
    """
    rows = g_idx.shape[0]
    in_order = torch.arange(rows, device=g_idx.device) // group_size
    if torch.equal(g_idx.long(), in_order):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm].long(), in_order):
        raise ValueError("groups are not of equal size")
    return perm.to(torch.int32)


def prepare_weight(layer: QuantLinear) -> PreparedWeight:
    """Kernel layout of one layer (see the module docstring); raises ValueError when the layout cannot be made."""
    # One group of 2**31 rows stands for group_size -1: every row index shifts down to group 0.
    group_shift = 31 if layer.group_size == -1 else layer.group_size.bit_length() - 1
    perm = group_order(layer.g_idx, 1 << group_shift)
    order = kernel_row_order(layer.in_features, layer.bits).to(layer.qweight.device)
    if perm is not None:
        order = perm.long()[order]  # sorted by group, then into kernel slots
    # Column slices: unpacked, a layer takes 32 / bits times its packed size (1.4 GB more for LLaMA-65B's
    # gate/up in one piece, on the GPU that is loading it).
    qweight = torch.cat([
        pack_kernel_rows(gptq_format.unpack_rows(layer.qweight[:, cols], layer.bits, layer.in_features)[order],
                         layer.bits)
        for cols in column_slices(layer.out_features, REPACK_COLUMNS)], dim=1)
    zeros = gptq_format.unpack_zeros(layer.qzeros, layer.bits, layer.out_features, layer.zero_offset)
    return PreparedWeight(qweight, fp16_pairs(layer.scales, zeros.half()), perm, layer.bits, group_shift)


REPACK_COLUMNS = 2048  # per slice of prepare_weight: 64 MiB unpacked at K = 8192


def column_slices(cols: int, width: int) -> list[slice]:
    """Consecutive ranges of `width` columns (the last one narrower) covering `cols`."""
    return [slice(c, min(c + width, cols)) for c in range(0, cols, width)]


def kernel_row_order(rows: int, bits: int) -> torch.Tensor:
    """Row index to pack at each position so that word slot s holds the row `triton_gemv.word_slot` puts there
    (for 3 bits: the slots of the four 4-bit words the GEMV unpacks each unit into)."""
    per_word = 32 // slot_bits(bits)
    slot_row = [0] * per_word
    for row in range(per_word):
        slot_row[word_slot(row, bits)] = row
    return (torch.arange(0, rows, per_word)[:, None] + torch.tensor(slot_row)).flatten()


def pack_kernel_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int32 [K, N] in `kernel_row_order` -> qweight int32 [K * bits / 32, N] in kernel layout."""
    return pack_3bit_units(codes) if bits == 3 else gptq_format.pack_rows(codes, bits)


def pack_3bit_units(codes: torch.Tensor) -> torch.Tensor:
    """3-bit codes int32 [K, N] (K a multiple of 32), rows in `kernel_row_order` -> int32 [3 * K / 32, N].

    Each unit of 32 rows becomes three words w = 0, 1, 2 of eight 4-bit slots: slot s of word w holds the code of
    row 8w + s in its low 3 bits and bit w of the code of row 24 + s in its top bit (`triton_gemv._fourth_word`
    gathers those back)."""
    units = codes.reshape(-1, 4, 8, codes.shape[1])  # [K/32, 4 words of 8 slots, N]
    top = torch.stack([(units[:, 3] >> w) & 1 for w in range(3)], dim=1)  # [K/32, 3, 8, N]
    nibbles = units[:, :3] | (top << 3)
    return gptq_format.pack_rows(nibbles.reshape(-1, codes.shape[1]), 4)


def fp16_pairs(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """int32 words holding the bits of two fp16 tensors of one shape: `low` in bits 0-15, `high` in bits 16-31."""
    as_int = lambda t: t.contiguous().view(torch.int16).to(torch.int32)  # noqa: E731 (sign-extended)
    return (as_int(low) & 0xFFFF) | (as_int(high) << 16)


@dataclass
class Fallback:
    """State of a layer the Triton kernels cannot run: the torch backend's state and why."""

    backend: TorchBackend
    state: object
    reason: str


class Scratch:
    """One dense-weight buffer per device and dtype for the dequantize + cuBLAS path. Layers are dequantized in
    column slices of at most SLICE_ELEMENTS (256 MiB in fp16): the whole of LLaMA-65B's fused gate/up projection
    would take 721 MB, memory the KV cache can use instead. Smaller slices cost time: at 128 MiB, the 7B gate/up
    in two slices made a 128-token prefill 38 -> 53 ms on the H100 (BENCHMARKS.md); 7B layers fit one slice."""

    SLICE_ELEMENTS = 128 * 2**20

    _buffers: dict = {}

    @classmethod
    def get(cls, device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
        buffer = cls._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < rows * cols:
            buffer = torch.empty(rows * cols, dtype=dtype, device=device)
            cls._buffers[(device, dtype)] = buffer
        return buffer[: rows * cols].view(rows, cols)

    @classmethod
    def column_slices(cls, rows: int, cols: int) -> list[slice]:
        """Column ranges of a [rows, cols] weight, each at most SLICE_ELEMENTS (whole multiples of 128 columns
        where they are split)."""
        return column_slices(cols, max(128, cls.SLICE_ELEMENTS // rows // 128 * 128))


# Up to GEMV_PASSES * MAX_ROWS rows (a server's decode batch) run as GEMV passes of MAX_ROWS rows. Each pass reads
# the 4-bit weight once; dequantize + cuBLAS writes and reads it in fp16 besides. On an H200 (BENCHMARKS.md,
# 2026-12-01) dequantize + cuBLAS at 16 rows took 26 / 68 / 125 us on the 7B o / down / gate_up layers, against
# 7 / 12 / 20 us for one single-row GEMV (eighth and ninth sessions).
GEMV_PASSES = 4
# From this many rows the tensor-core kernel (triton_skinny) runs instead: the GEMV's cost grows with the rows, the
# tensor-core kernel's hardly. On an H200 (BENCHMARKS.md, 2026-12-01, 7B layers o, qkv, down, gate_up, 4-bit g128)
# the four took 52 us with the GEMV at 1 row and 66 at 2 rows (ninth session; 94 at 4 rows in the eighth), and
# 61-63 us with the tensor-core kernel at any of 2-16 rows.
# TALIS_SKINNY_FROM_ROWS overrides it (A/B runs; 129: never).
SKINNY_FROM_ROWS = int(os.environ.get("TALIS_SKINNY_FROM_ROWS", 3))
# Up to this many rows (at most MAX_SKINNY_ROWS) the tensor-core kernel runs; more go to dequantize + cuBLAS. On an
# H200 at 128 rows (7B layers, 4-bit g128) it took 20 / 35 us on o / down against 31 / 73 for dequantize + cuBLAS
# (BENCHMARKS.md, 2026-12-01). TALIS_SKINNY_TO_ROWS overrides it (A/B runs of short prefills).
SKINNY_TO_ROWS = min(int(os.environ.get("TALIS_SKINNY_TO_ROWS", MAX_SKINNY_ROWS)), MAX_SKINNY_ROWS)


def quantized_product(x2d: torch.Tensor, args: tuple) -> torch.Tensor:
    """x2d [M, K] (contiguous) @ W -> [M, N] in x2d's dtype; `args` as PreparedWeight.args(). SKINNY_FROM_ROWS to
    SKINNY_TO_ROWS rows: the tensor-core kernel where it serves the layer (`triton_skinny.usable`); otherwise up to
    MAX_ROWS rows one GEMV, up to GEMV_PASSES * MAX_ROWS GEMV passes of MAX_ROWS rows; more: dequantize + cuBLAS."""
    qweight, bits, group_shift = args[0], args[3], args[4]
    m, k, n = x2d.shape[0], qweight.shape[0] * 32 // bits, qweight.shape[1]
    if SKINNY_FROM_ROWS <= m <= SKINNY_TO_ROWS and skinny_usable(bits, group_shift):
        return quant_skinny(x2d, *args)
    if m <= MAX_ROWS:
        return quant_gemv(x2d, *args)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m <= GEMV_PASSES * MAX_ROWS:
        for start in range(0, m, MAX_ROWS):
            quant_gemv(x2d[start : start + MAX_ROWS], *args, out=y[start : start + MAX_ROWS])
        return y
    for cols in Scratch.column_slices(k, n):
        scratch = Scratch.get(x2d.device, x2d.dtype, k, cols.stop - cols.start)
        torch.matmul(x2d, dequantize_into(scratch, *args, first_column=cols.start), out=y[:, cols])
    return y


class TritonBackend:
    """QuantLinear backend running the Triton kernels; falls back to TorchBackend where they do not apply."""

    def prepare(self, layer: QuantLinear) -> PreparedWeight | Fallback:
        reason = unsupported_reason(layer)
        if reason is None:
            try:
                weight = prepare_weight(layer)
            except ValueError:
                reason = "act-order groups of unequal size"
        if reason is not None:
            fallback = TorchBackend()
            return Fallback(fallback, fallback.prepare(layer), reason)
        if layer.qweight.device.type == "cuda":
            n = layer.out_features
            Workspace.reserve(layer.qweight.device, *map(max, gemv_workspace_size(n), skinny_workspace_size(n)))
        return weight

    @staticmethod
    def self_contained(state) -> bool:
        """Whether `state` needs none of the layer's GPTQ tensors (only its bias)."""
        return isinstance(state, PreparedWeight)

    def forward(self, layer: QuantLinear, state, x2d: torch.Tensor) -> torch.Tensor:
        """x2d: [M, in] -> [M, out] in x2d's dtype."""
        if isinstance(state, Fallback):
            return state.backend.forward(layer, state.state, x2d)
        y = quantized_product(x2d.contiguous(), state.args())
        if layer.bias is not None:
            y += layer.bias.to(y.dtype)
        return y


register_backend("triton", TritonBackend)


def input_gather(module) -> torch.Tensor | None:
    """For a QuantLinear running the Triton kernels with act-order: the permutation of its input features that
    its kernels read (int32 [K]); None for any other module. A kernel producing the input can write it in this
    order, and `forward_gathered` then saves the GEMV its per-element gather."""
    state = module.backend_state if isinstance(module, QuantLinear) else None
    return state.perm if isinstance(state, PreparedWeight) else None


def input_scatter(module) -> torch.Tensor | None:
    """The inverse of `input_gather(module)` (int32 [K]): a kernel producing the input writes feature f to column
    input_scatter[f]; None where `input_gather` is None."""
    perm = input_gather(module)
    return None if perm is None else torch.argsort(perm).to(torch.int32)


def forward_gathered(layer: QuantLinear, x_gathered: torch.Tensor) -> torch.Tensor:
    """layer(x) for x_gathered = x[:, input_gather(layer)], [M, in] -> [M, out]."""
    state = layer.backend_state
    # without the permutation: the rows of the kernels' layout are the features in x_gathered's order
    y = quantized_product(x_gathered, (state.qweight, state.scale_zero, None, state.bits, state.group_shift))
    if layer.bias is not None:
        y += layer.bias.to(y.dtype)
    return y
