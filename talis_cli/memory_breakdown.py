"""Where the GPU memory of a `talis bench --shape` run goes: bytes per part, computed from the code's own layouts.

`talis bench` reports peak memory as `torch.cuda.max_memory_allocated` over the whole row (build, KV cache,
prefill, decode), divided by 10^9 (its GB; the CUDA context and the allocator's cached but unused memory are not
in it). This module names what that counts for a random GPTQ model of a named shape built by
`bench.random_model` (the "triton" backend, its GPTQ tensors released) and timed by `bench.time_model`:

- held from the build on (static): the packed codes and the scale/zero words in kernel layout
  (`triton_backend.prepare_weight`), act-order permutations, the fp16 embedding and lm_head, the norms, the KV
  cache (`kv_cache.KVCache`), the split-K workspace (`triton_gemv.Workspace`, reserved at prepare for the widest
  layer at MAX_SKINNY_ROWS rows) and the rotary tables of the fast prefill and decode step;
- held from the first prefill / decode on (runtime): the cuBLAS workspaces of the fp16 lm_head, one per stream
  it runs on (the caller's stream for the prefill, the capture stream for the decode graph);
- while tuning only: the L2-flush buffer (`autotune_cache._L2Flush`, twice the L2) for shapes the shipped table
  lacks (every 65B shape);
- transients: activations of a prefill of `prompt` tokens (an estimate: the largest set live at once).

`parts(...)` gives them; `static_bytes(...)` their static sum, which tests compare with the tensors a tiny model
really holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from quant_kernels import gptq_format

from .config import ModelArgs
from .kv_cache import SCALE_BYTES, STORAGE, check_kind

GB = 1e9  # what talis bench divides by
GiB = 2**30
CUBLAS_WORKSPACE = 32 * 2**20  # torch's default cuBLAS workspace on Hopper (compute capability 9.0)
H200_L2 = 50 * 2**20  # L2 size an H100 / H200 reports


@dataclass(frozen=True)
class Part:
    """One line of the breakdown: `name`, `nbytes`, when it is held ("static", "runtime", "tuning",
    "transient") and a note (what it is; "avoidable: ..." where it need not be there)."""

    name: str
    nbytes: int
    held: str
    note: str = ""


def fused_linears(args: ModelArgs) -> list[tuple[str, int, int]]:
    """(name, in, out) of one decoder layer's quantized linears as the fast path holds them (bench.linear_shapes,
    named)."""
    from .bench import linear_shapes

    return [(name, k, n) for name, (k, n) in zip(("qkv", "o", "gate_up", "down"), linear_shapes(args))]


def kernel_layout_bytes(k: int, n: int, bits: int, group_size: int, act_order: bool) -> dict[str, int]:
    """Bytes of one layer in `triton_backend.PreparedWeight`: qweight int32 [K*bits/32, N] (3-bit units of 32 rows
    in three words: the same count), scale_zero int32 [groups, N] (fp16 scale and fp16 zero point per word),
    perm int32 [K] with act-order."""
    return dict(qweight=4 * gptq_format.packed_length(k, bits) * n,
                scale_zero=4 * gptq_format.num_groups(k, group_size) * n,
                perm=4 * k if act_order else 0)


def kv_cache_bytes(args: ModelArgs, rows: int, slots: int, kind: str, float_bytes: int = 2) -> dict[str, int]:
    """Bytes of every layer's KVCache buffers: codes (k and v) and, for an 8-bit kind, their fp32 scales."""
    vectors = args.n_layers * 2 * rows * args.n_kv_heads * slots  # head vectors of keys and values
    if check_kind(kind) in STORAGE:
        return dict(codes=vectors * args.head_dim, scales=vectors * SCALE_BYTES)
    return dict(codes=vectors * args.head_dim * float_bytes, scales=0)


def workspace_bytes(args: ModelArgs) -> int:
    """The split-K workspace (fp32 partials + int32 tickets) the Triton backend reserves at prepare: the largest
    GEMV and tensor-core needs over the layers' output widths."""
    from quant_kernels.triton_gemv import gemv_workspace_size
    from quant_kernels.triton_skinny import skinny_workspace_size

    widths = [n for _, _, n in fused_linears(args)]
    partials = max(max(gemv_workspace_size(n)[0], skinny_workspace_size(n)[0]) for n in widths)
    tickets = max(max(gemv_workspace_size(n)[1], skinny_workspace_size(n)[1]) for n in widths)
    return 4 * partials + 4 * tickets


def parts(args: ModelArgs, bits: int, group_size: int, ctx: int, kv_cache: str = "int8", prompt: int = 128,
          act_order: bool = False, rows: int = 1, tuning: bool = True, l2_bytes: int = H200_L2,
          cublas_workspace: int = CUBLAS_WORKSPACE, before: bool = False) -> list[Part]:
    """The breakdown of one `talis bench --shape` row (see the module docstring): fp16 model, `rows` cache rows of
    `ctx` slots of kind `kv_cache`, a prefill of `prompt` tokens; `tuning`: its shapes are not in the shipped
    table (the L2-flush buffer is allocated while they are timed). `before`: as the code stood before this
    module (session 10): g_idx kept by released layers, the L2-flush buffer held to the end, a cuBLAS workspace
    for a fresh side stream per capture."""
    layer = {name: kernel_layout_bytes(k, n, bits, group_size, act_order) for name, k, n in fused_linears(args)}
    kv = kv_cache_bytes(args, rows, ctx, kv_cache)
    head_bytes = 2 * args.vocab_size * args.dim
    tables = 2 * 2 * (2 * ctx * args.head_dim)  # cos + sin [ctx, hd] fp16, the prefill's and the decode step's
    out = [Part(f"{bits}-bit codes, kernel layout ({name})", args.n_layers * b["qweight"], "static")
           for name, b in layer.items()]
    out.append(Part("scale/zero words (4 B per group and column)",
                    args.n_layers * sum(b["scale_zero"] for b in layer.values()), "static",
                    "fp16 scale + fp16 zero; fp16 scales alone would save half: a kernel change, measured slower"))
    if before:
        out.append(Part("g_idx of released layers (int32 per input row)",
                        args.n_layers * sum(4 * k for _, k, _ in fused_linears(args)), "static",
                        "avoidable: the Triton state keeps its own permutation"))
    if act_order:
        out.append(Part("act-order permutations", args.n_layers * sum(b["perm"] for b in layer.values()), "static"))
    out += [Part("embedding (fp16)", head_bytes, "static", "one row read per decode step"),
            Part("lm_head (fp16)", head_bytes, "static"),
            Part("RMSNorm weights", (2 * args.n_layers + 1) * args.dim * 2, "static"),
            Part(f"KV cache codes ({kv_cache}, {rows} x {ctx} slots)", kv["codes"], "static")]
    if kv["scales"]:
        out.append(Part("KV cache scales (fp32 per head vector)", kv["scales"], "static"))
    out += [Part("split-K workspace (fp32, 128 rows x widest layer)", workspace_bytes(args), "static",
                 "sized for the tensor-core kernel's 128 rows; must exist before any capture"),
            Part("rotary tables (prefill + decode step)", tables, "static"),
            Part("cuBLAS workspaces (lm_head): " + ("3 streams" if before else "2 streams"), (3 if before else 2) * cublas_workspace, "runtime",
                 "avoidable: one more per fresh side stream" if before else "one per stream (capture_stream)")]
    if tuning:
        out.append(Part("L2-flush buffer (2 x L2)", 2 * l2_bytes, "runtime" if before else "tuning",
                        "avoidable: held to the end of the run" if before else "only while a shape is tuned"))
    # the MLP of a prefill layer: residual, norm output, gate/up output, SiLU*mul output (fp16), plus the 8-bit
    # cache's dequantized keys and values of the prompt (fp32 products then fp16)
    mlp = prompt * (2 * args.dim + 2 * args.intermediate_size + args.intermediate_size) * 2
    attention = 2 * prompt * args.n_kv_heads * args.head_dim * (4 + 2)
    out.append(Part(f"prefill activations, {prompt} tokens (estimate)", mlp + attention, "transient"))
    return out


def static_bytes(breakdown: list[Part]) -> int:
    """Bytes held from the build on (the parts marked "static")."""
    return sum(p.nbytes for p in breakdown if p.held == "static")


def expected_peak(breakdown: list[Part]) -> int:
    """Static + runtime parts + the tuning buffer + the transients (tuning runs inside the first prefill and
    decode, with their activations live, so both count)."""
    held = sum(p.nbytes for p in breakdown if p.held in ("static", "runtime"))
    return held + sum(p.nbytes for p in breakdown if p.held in ("tuning", "transient"))


def format_table(breakdown: list[Part]) -> str:
    """The breakdown as a text table: bytes, GB (10^9, what talis bench prints) and GiB."""
    lines = [f"{'part':<56} {'held':<9} {'bytes':>15} {'GB':>7} {'GiB':>7}"]
    for p in breakdown:
        lines.append(f"{p.name:<56} {p.held:<9} {p.nbytes:>15,} {p.nbytes / GB:>7.3f} {p.nbytes / GiB:>7.3f}"
                     + (f"  ({p.note})" if p.note else ""))
    for label, total in (("static", static_bytes(breakdown)), ("expected peak", expected_peak(breakdown))):
        lines.append(f"{label:<56} {'':<9} {total:>15,} {total / GB:>7.3f} {total / GiB:>7.3f}")
    return "\n".join(lines)

