"""The slice of every weight a tensor-parallel rank holds, and the checks that a model splits N ways.

Column-parallel layers (q/k/v, gate/up) keep a contiguous block of output columns: whole attention heads (and whole
KV heads) or a block of the MLP's hidden features. Row-parallel layers (o_proj, down_proj) keep the matching block
of input rows; their partial outputs are summed over the ranks (an all-reduce, `RowParallel`). Everything else
(embeddings, norms, lm_head) is replicated.

GPTQ tensors: a column block slices qweight, scales and qzeros by column (qzeros unpacked and packed again); a row
block slices qweight's packed words. Without act-order a row block holds whole quantization groups, so its scales
and qzeros are the rows of its groups and its g_idx counts from 0. With act-order (desc_act) a row's group is any
group, so a row block keeps its rows' own g_idx entries and every group's scales and zeros (`group_tables`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TalisError

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
_LAYER = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(\w+)$")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` tensor-parallel ranks; `device` is where its weights go ("cuda:R" or "cpu").

    bits / group_size / act_order describe GPTQ weights (bits None: float weights).
    """

    rank: int
    world: int
    device: str = "cpu"
    bits: int | None = None
    group_size: int = -1
    act_order: bool = False
    all_reduce: object = field(default=None, compare=False, repr=False)  # comm.AllReduce of this rank's world
    graphs: bool = True  # the decode step may be captured in CUDA graphs (comm.AllReduce.prepare)

    def with_quant(self, quant) -> "Shard":
        """This shard for weights of QuantSettings `quant` (None: float weights)."""
        if quant is None:
            return dataclasses.replace(self, bits=None)
        return dataclasses.replace(self, bits=quant.bits, group_size=quant.group_size, act_order=quant.desc_act)

    # --- the model's sizes on one rank ---------------------------------------------------------------------
    def check(self, args) -> None:
        """TalisError (one line) when the model does not split `world` ways: heads, KV heads and the MLP's hidden
        features must divide, and a row-parallel block must hold whole quantization groups."""
        n = self.world
        flag = f"--tensor-parallel {n}"
        if args.n_heads % n or args.n_kv_heads % n:
            raise TalisError(f"{flag}: the model has {args.n_heads} attention heads and {args.n_kv_heads} KV heads; "
                             f"N must divide both (try {', '.join(map(str, divisors(args.n_kv_heads, args.n_heads)))})")
        if args.intermediate_size % n:
            raise TalisError(f"{flag}: the MLP's {args.intermediate_size} hidden features do not split {n} ways; "
                             f"choose an N that divides {args.intermediate_size}")
        if self.bits is not None and self.group_size != -1:
            for in_features in (args.n_heads * args.head_dim, args.intermediate_size):
                if in_features % (n * self.group_size):
                    raise TalisError(
                        f"{flag} would cut a quantization group: a row-parallel layer of in_features "
                        f"{in_features} splits into blocks of {in_features / n:g} rows, not a multiple of the group "
                        f"size {self.group_size}; choose an N with in_features divisible by N x {self.group_size}")

    def local_args(self, args):
        """ModelArgs of this rank's part: 1/N of the heads, KV heads and MLP features (head_dim unchanged)."""
        self.check(args)
        n = self.world
        return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                                   intermediate_size=args.intermediate_size // n)

    # --- tensors -------------------------------------------------------------------------------------------
    def tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (the tensor itself when it is replicated)."""
        m = _LAYER.search(name)
        if m is None:
            return tensor
        kind, attr = ("column" if m.group(1) in COLUMN_PARALLEL else "row"), m.group(2)
        if attr == "weight":  # float nn.Linear [out, in]
            return _block(tensor, 0 if kind == "column" else 1, self.rank, self.world)
        if kind == "column":
            return self._column(attr, tensor)
        return self._row(name, attr, tensor)

    def _column(self, attr: str, t: torch.Tensor) -> torch.Tensor:
        from quant_kernels import gptq_format

        if attr in ("qweight", "scales"):  # [words or groups, out]
            return _block(t, 1, self.rank, self.world)
        if attr == "qzeros":  # [groups, out*bits/32]: packed along the columns
            cols = t.shape[1] * 32 // self.bits
            return gptq_format.pack_cols(_block(gptq_format.unpack_cols(t, self.bits, cols), 1, self.rank, self.world),
                                         self.bits)
        if attr == "bias":
            return _block(t, 0, self.rank, self.world)
        return t  # g_idx: one entry per input row, all of which every column block keeps

    def _row(self, name: str, attr: str, t: torch.Tensor) -> torch.Tensor:
        from quant_kernels import gptq_format

        if attr == "bias":  # added once, after the all-reduce (RowParallel)
            return t
        if attr == "qweight":
            rows = t.shape[0] * 32 // self.bits
            if (rows // self.world) * self.bits % 32 == 0:
                return _block(t, 0, self.rank, self.world)  # whole words per block
            return gptq_format.pack_rows(_block(gptq_format.unpack_rows(t, self.bits, rows), 0, self.rank, self.world),
                                         self.bits)
        if attr == "g_idx":
            rows = _block(t, 0, self.rank, self.world)
            if self.act_order:
                return rows  # its own entries, into every group's scales and zeros
            if self.group_size != -1 and not torch.equal(t.long(), torch.arange(t.numel()) // self.group_size):
                raise TalisError(f"{name}: g_idx is not in order but the quantize config says desc_act false; "
                                 f"set \"desc_act\": true if the weights use act-order")
            return rows - rows.min() if self.group_size != -1 else rows
        # scales / qzeros [groups, ...]: the block's own groups, or all of them with act-order or one group
        if self.act_order or self.group_size == -1:
            return t
        return _block(t, 0, self.rank, self.world)

    def group_tables(self, layer, full_in_features: int) -> None:
        """Give a row-parallel QuantLinear built on the meta device (1/N of the input rows) the scales and qzeros
        shapes of its checkpoint part: every group with act-order or group size -1, else its own groups."""
        from quant_kernels import gptq_format

        groups = gptq_format.num_groups(full_in_features, layer.group_size)
        if self.act_order and layer.group_size != -1:
            layer.scales = torch.empty(groups, layer.out_features, dtype=layer.scales.dtype, device="meta")
            layer.qzeros = torch.empty(groups, layer.qzeros.shape[1], dtype=torch.int32, device="meta")

    # --- the model after loading ---------------------------------------------------------------------------
    def prepare(self, model, full_args) -> None:
        """Before the tensors are read: act-order row-parallel layers get the group tables of their part."""
        from quant_kernels.quant_linear import QuantLinear

        full_in = {"o_proj": full_args.n_heads * full_args.head_dim, "down_proj": full_args.intermediate_size}
        for block in model.model.layers:
            for layer in (block.self_attn.o_proj, block.mlp.down_proj):
                if isinstance(layer, QuantLinear):
                    name = "o_proj" if layer is block.self_attn.o_proj else "down_proj"
                    self.group_tables(layer, full_in[name])

    def wrap(self, model) -> None:
        """After loading: o_proj and down_proj of every layer become `RowParallel` (summed over the ranks by
        this shard's `all_reduce`)."""
        for block in model.model.layers:
            block.self_attn.o_proj = RowParallel(block.self_attn.o_proj, self.all_reduce)
            block.mlp.down_proj = RowParallel(block.mlp.down_proj, self.all_reduce)


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's block of input rows (`inner`, bias removed), the partial outputs summed
    over the ranks by `all_reduce` (in place on a [..., out] tensor), then the bias added once."""

    def __init__(self, inner: nn.Module, all_reduce):
        super().__init__()
        bias = inner.bias  # a Parameter or buffer of [out], or None
        inner.bias = None
        self.inner = inner
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.register_buffer("bias", bias)
        self.all_reduce = all_reduce
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in / N] -> [..., out], the same on every rank."""
        y = self.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _block(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size).contiguous()


def divisors(*numbers: int) -> list[int]:
    """Common divisors above 1 of `numbers`, at most 8 (the N a model splits into)."""
    return [n for n in range(2, 9) if all(x % n == 0 for x in numbers)] or [1]
