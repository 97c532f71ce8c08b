"""`talis bench`: decode and prefill speed against the memory-bandwidth floor, with in-run baselines.

Batch-1 decoding reads every weight once per token, plus the KV cache of the context so far, so
floor(time per token) = (quantized weights + scales/zeros + fp16 lm_head + KV read) / copy bandwidth, with the
copy bandwidth measured in the same run. Models of a named LLaMA shape are built from random GPTQ tensors
directly on the GPU (no file); `--model DIR` loads a real checkpoint instead. The same shape is then timed with
fp16 weights (cuBLAS) and, where torch has it, with torch's int4 kernel, all through the same CUDA-graph decode.

Timing windows: prefill of `prompt` tokens starting at slot 0 as `generate` runs it (talis_cli.fast_prefill on
GPUs; its time is the time to first token, greedy draw included); decode of `gen` tokens in the last `gen` slots
of a `ctx`-slot cache, one host read per token, each after the next step is queued, as streaming does
(talis_cli.step_queue). The floor's KV term uses the mean context of that window. A model split over GPUs
(--model with a device map) decodes as `generate` does: one CUDA graph per GPU.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import triton.testing
from torch import nn

import quant_kernels.triton_backend  # noqa: F401  (registers the "triton" QuantLinear backend)
from quant_kernels import gptq_format
from quant_kernels.quant_linear import QuantLinear

from .config import ModelArgs
from .engine import Engine, LoadSettings
from .errors import TalisError, UsageError
from .fast_decode import CudaGraphDecoder, graph_devices
from .fast_prefill import prefill_runner
from .kv_cache import check_devices, check_kind, slot_bytes
from .model import Transformer, current_device
from .step_queue import greedy_decode

GB = 1e9


@dataclass(frozen=True)
class Shape:
    dim: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int = 32000
    rope_theta: float = 10000.0


SHAPES = {  # LLaMA 1 (MHA, vocab 32000) and LLaMA 3 (GQA, vocab 128256)
    "7B": Shape(4096, 11008, 32, 32, 32),
    "13B": Shape(5120, 13824, 40, 40, 40),
    "33B": Shape(6656, 17920, 60, 52, 52),
    "65B": Shape(8192, 22016, 80, 64, 64),
    "70B": Shape(8192, 28672, 80, 64, 8, 128256, 500000.0),
    "8B": Shape(4096, 14336, 32, 32, 8, 128256, 500000.0),
}


def shape_args(name: str, max_seq_len: int) -> ModelArgs:
    """ModelArgs of a named shape (case-insensitive) with a context of `max_seq_len`."""
    shape = SHAPES.get(name.upper())
    if shape is None:
        raise UsageError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return ModelArgs(vocab_size=shape.vocab, dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads,
                     n_kv_heads=shape.n_kv_heads, head_dim=shape.dim // shape.n_heads,
                     intermediate_size=shape.intermediate, rope_theta=shape.rope_theta,
                     max_position_embeddings=max(max_seq_len, 2048), bos_token_id=None, eos_token_ids=[])


def linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's quantized linears, q/k/v and gate/up fused as the fast path runs them."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return [(args.dim, q_out + 2 * kv_out), (q_out, args.dim), (args.dim, 2 * args.intermediate_size),
            (args.intermediate_size, args.dim)]


def floor_bytes(args: ModelArgs, bits: int, group_size: int, context: float, head_bytes: float | None = None,
                kv_cache: str = "fp16") -> dict:
    """Bytes one decode step must read at batch 1 with `context` cached tokens; bits 16 means fp16 weights.

    weights: packed codes (or fp16); scales_zeros: fp16 scales and `bits`-bit zeros per group and column;
    lm_head: `head_bytes` (a quantized head's GPTQ bytes), else fp16; kv: keys and values of every layer for
    `context` tokens, at most the sliding window's, fp16 or (`kv_cache` "int8", "fp8") 8-bit codes with their scales.
    """
    if args.sliding_window:
        context = min(context, args.sliding_window)
    weights = scales_zeros = 0.0
    for k, n in linear_shapes(args):
        weights += k * n * bits / 8
        if bits < 16:
            groups = 1 if group_size == -1 else math.ceil(k / group_size)
            scales_zeros += groups * n * (2 + bits / 8)
    parts = dict(weights=weights * args.n_layers, scales_zeros=scales_zeros * args.n_layers,
                 lm_head=2.0 * args.vocab_size * args.dim if head_bytes is None else head_bytes,
                 kv=float(args.n_layers * slot_bytes(args.n_kv_heads, args.head_dim, kv_cache)) * context)
    parts["total"] = sum(parts.values())
    return parts


# --- where the layers of a random model go -----------------------------------------------------------------------
def gptq_tensor_shapes(args: ModelArgs, bits: int, group_size: int) -> dict[str, list[int]]:
    """Tensor shapes of an AutoGPTQ checkpoint of `args` (fp16 embedding and head), what the planner reads from a
    folder's headers."""
    groups = lambda k: 1 if group_size == -1 else math.ceil(k / group_size)  # noqa: E731
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linears = {"self_attn.q_proj": (args.dim, q_out), "self_attn.k_proj": (args.dim, kv_out),
               "self_attn.v_proj": (args.dim, kv_out), "self_attn.o_proj": (q_out, args.dim),
               "mlp.gate_proj": (args.dim, args.intermediate_size), "mlp.up_proj": (args.dim, args.intermediate_size),
               "mlp.down_proj": (args.intermediate_size, args.dim)}
    shapes = {"model.embed_tokens.weight": [args.vocab_size, args.dim], "model.norm.weight": [args.dim],
              "lm_head.weight": [args.vocab_size, args.dim]}
    for i in range(args.n_layers):
        for name, (k, n) in linears.items():
            p = f"model.layers.{i}.{name}"
            shapes.update({f"{p}.qweight": [gptq_format.packed_length(k, bits), n],
                           f"{p}.qzeros": [groups(k), gptq_format.packed_length(n, bits)],
                           f"{p}.scales": [groups(k), n], f"{p}.g_idx": [k]})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = [args.dim]
    return shapes


def plan_shape(args: ModelArgs, bits: int, group_size: int, ctx: int, device_map: str | None,
               max_memory: str | None, kv_cache: str = "fp16"):
    """The DevicePlan of a random model of `args` with a KV cache of `ctx` slots, as `generate` would plan the same
    checkpoint: a device map (name or file) and/or --max-memory caps. TalisError / UsageError, before anything is
    built, for a map naming a GPU this machine lacks or a part that overflows its cap."""
    from .memory_plan import footprint, parse_max_memory
    from .model_info import kv_cache_bytes
    from .placement import load_device_map, plan_devices

    label, raw = load_device_map(device_map or "auto")
    caps = parse_max_memory(max_memory) if max_memory else None
    fp = footprint(gptq_tensor_shapes(args, bits, group_size), args.n_layers,
                   kv_cache_bytes(args, ctx, dtype_bytes=2, kind=kv_cache) // args.n_layers, float_bytes=2)
    plan = plan_devices(raw, args.n_layers, f"device map {label}", fp, caps)
    if not plan.uses_cuda or "cpu" in plan.devices:
        raise UsageError(f"talis bench --shape places every layer on a GPU; the plan puts parts on the CPU "
                         f"({', '.join(plan.devices)}); give GPUs in the map or --max-memory")
    return plan


# --- random models built on the GPU ------------------------------------------------------------------------------
def random_quant_linear(in_features: int, out_features: int, bits: int, group_size: int, act_order: bool, device):
    """A QuantLinear of random GPTQ tensors made on `device`: uniform codes, symmetric zeros (v1 format) and
    scales that keep the output's spread near the input's."""
    layer = QuantLinear(in_features, out_features, bits, group_size, device=device)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=device))
    zeros = torch.full((layer.qzeros.shape[0], out_features), 2 ** (bits - 1) - 1, dtype=torch.int32, device=device)
    layer.qzeros.copy_(gptq_format.pack_cols(zeros, bits))  # zero = 2^(bits-1) (v1 stores it less 1): codes centred
    code_std = math.sqrt((4 ** bits - 1) / 12)
    layer.scales.uniform_(0.5, 1.5).mul_(1 / (code_std * math.sqrt(in_features)))
    if act_order:
        layer.g_idx.copy_(layer.g_idx[torch.randperm(in_features, device=device)])
    return layer


class TorchInt4Linear(nn.Module):
    """torch's built-in int4 linear (`_weight_int4pack_mm`, bf16 activations) with random codes and scales."""

    def __init__(self, in_features: int, out_features: int, group_size: int, device):
        super().__init__()
        codes = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device)
        self.weight = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        scales = torch.empty(in_features // group_size, out_features, device=device).uniform_(0.5, 1.5)
        scales /= math.sqrt((4 ** 4 - 1) / 12) * math.sqrt(in_features)
        self.scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], -1).to(torch.bfloat16)
        self.group_size, self.out_features = group_size, out_features

    def forward(self, x):
        """x [..., in] bf16 -> [..., out] bf16."""
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group_size,
                                               self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def random_model(args: ModelArgs, kind: str, bits: int, group_size: int, act_order: bool, device):
    """A Transformer of random weights on `device` (a device, or a placement.DevicePlan: each part built directly
    on its GPU), q/k/v and gate/up already fused.

    kind: "gptq" (QuantLinear, Triton backend, fp16), "fp16" (nn.Linear) or "int4" (torch's int4 kernel, bf16).
    """
    dtype = torch.bfloat16 if kind == "int4" else torch.float16
    def place(name: str) -> torch.device:
        return torch.device(device.device_for(name) if hasattr(device, "device_for") else device)

    def linear(k: int, n: int, device):
        if kind == "gptq":
            layer = random_quant_linear(k, n, bits, group_size, act_order, device)
            layer.set_backend("triton", keep_source=False)
            return layer
        if kind == "int4":
            return TorchInt4Linear(k, n, group_size, device)
        layer = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        nn.init.normal_(layer.weight, std=1 / math.sqrt(k))
        return layer.requires_grad_(False)

    with torch.device("meta"):
        model = Transformer(args)
    (qkv, o, gate_up, down) = linear_shapes(args)
    for i, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        layer_device = place(f"model.layers.{i}")
        for name in ("q_proj", "k_proj", "v_proj"):
            delattr(attn, name)
            setattr(attn, name, None)
        for name in ("gate_proj", "up_proj"):
            delattr(mlp, name)
            setattr(mlp, name, None)
        with current_device(layer_device):  # Triton's prepare runs on the current device
            attn.qkv_proj, attn.o_proj = linear(*qkv, layer_device), linear(*o, layer_device)
            mlp.gate_up_proj, mlp.down_proj = linear(*gate_up, layer_device), linear(*down, layer_device)
    norms = [("model.norm", model.model.norm)] + [(f"model.layers.{i}", n) for i, b in enumerate(model.model.layers)
                                                  for n in (b.input_layernorm, b.post_attention_layernorm)]
    for name, norm in norms:
        norm.weight = nn.Parameter(torch.ones(args.dim, device=place(name), dtype=dtype), requires_grad=False)
    for name, module, std in (("model.embed_tokens", model.model.embed_tokens, 1.0),
                              ("lm_head", model.lm_head, 1 / math.sqrt(args.dim))):
        module.weight = nn.Parameter(torch.randn(module.weight.shape, device=place(name), dtype=dtype) * std,
                                     requires_grad=False)
    return model.eval()


# --- timing ------------------------------------------------------------------------------------------------------
def copy_bandwidth(device, size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 20 copies."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size_bytes / statistics.median(times[5:])


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_model(model, prompt: int, gen: int, ctx: int, repeats: int = 3, decode_start: int | None = None,
               graphs: bool = True, kv_cache: str | None = None, prefill_graphs: bool = False) -> dict:
    """Prefill and decode timings (seconds, medians of `repeats` after a warm-up run) of a cached model, its KV
    cache of type `kv_cache` (None: the model's own kv_cache_kind). With `prefill_graphs`, also the prefill
    replayed as a CUDA graph (fast_prefill.PrefillRunner with graphs, prompts up to its largest bucket; timed
    last, after its capture) as prefill_graph_s, None where it does not apply."""
    device = model.model.embed_tokens.weight.device
    logits_device = model.logits_device  # another GPU when the model is split
    if kv_cache is not None:
        model.kv_cache_kind = kv_cache
    model.setup_cache(1, ctx)
    marks = {}  # phase -> (GB allocated now, GB peak so far) on CUDA: where a row's peak memory comes from
    mark_memory(marks, "cache")
    # the prefill generate runs: the fast one on GPUs, else the plain forward
    prefill_step = prefill_runner(model) or (lambda tokens, pos: model(tokens, start_pos=pos, last_only=True))
    if graphs and graph_devices(model) is not None:  # graphs False: tensor parallel without capturable all-reduces
        runner = CudaGraphDecoder(model)
    else:  # parts on the CPU: the plain path (fast_decode.graph_devices)
        runner = lambda tokens, pos: model(tokens, start_pos=pos)[:, -1]  # noqa: E731
    tokens = torch.randint(0, model.args.vocab_size, (1, prompt), device=device)
    start = ctx - gen if decode_start is None else decode_start  # by default decode fills the last `gen` slots

    def prefill():
        prefill_step(tokens, 0)[:, -1].argmax(-1).tolist()  # the first token reaches the host

    def decode():
        greedy_decode(runner, tokens[:, -1], range(start, start + gen), logits_device)

    timing = dict(prefill_s=None, prefill_error=None)
    with torch.inference_mode():
        try:
            _sync_time(prefill)  # tunes the prefill kernels
            timing["prefill_s"] = statistics.median(_sync_time(prefill) for _ in range(repeats))
        except Exception as e:  # a prefill kernel that fails here is reported; decode is still timed
            timing["prefill_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        mark_memory(marks, "prefill")
        _sync_time(decode)  # captures the graphs
        timing["decode_s"] = statistics.median(_sync_time(decode) for _ in range(repeats))
        mark_memory(marks, "decode")
        timing["prefill_graph_s"] = time_graph_prefill(model, tokens, repeats) if prefill_graphs else None
    timing["memory_gb"] = marks
    return timing


def mark_memory(marks: dict, phase: str) -> None:
    """marks[phase] = [GB allocated now, GB peak since the last reset], summed over the GPUs (nothing without
    CUDA): allocated is what stays, the peak what the phase (or one before it) touched."""
    if torch.cuda.is_available():
        gpus = range(torch.cuda.device_count())
        marks[phase] = [sum(torch.cuda.memory_allocated(g) for g in gpus) / GB,
                        sum(torch.cuda.max_memory_allocated(g) for g in gpus) / GB]


def time_graph_prefill(model, tokens: torch.Tensor, repeats: int) -> float | None:
    """Median seconds of a prefill of `tokens` [1, T] replayed as a CUDA graph (to the first token on the host),
    after the two runs that mark and capture its bucket; None where graphs do not apply (prefill_runner)."""
    runner = prefill_runner(model, graphs=True)
    if runner is None or runner.bucket(tokens.shape[1]) is None:
        return None

    def prefill():
        runner(tokens, 0)[:, -1].argmax(-1).tolist()

    for _ in range(2):  # the first prompt of a bucket marks it, the second captures it
        _sync_time(prefill)
    return statistics.median(_sync_time(prefill) for _ in range(repeats))


def gptq_bytes(layer: QuantLinear) -> int:
    """Bytes of the layer's weight in the GPTQ format (qweight, fp16 scales, qzeros): what a GEMV must read."""
    groups = gptq_format.num_groups(layer.in_features, layer.group_size)
    return (layer.in_features * layer.bits + groups * (16 + layer.bits)) * layer.out_features // 8


def gemv_table(model, bandwidth: float) -> list[dict]:
    """Each distinct quantized layer shape at batch 1: time (CUDA-graph replays over all layers of that shape,
    so the weights come from memory, not L2), achieved TB/s and % of copy bandwidth."""
    by_shape: dict[tuple, list] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    rows = []
    with torch.inference_mode():
        for (k, n), layers in by_shape.items():
            x = torch.randn(1, k, dtype=torch.float16, device=layers[0].g_idx.device)
            for layer in layers:
                layer(x)  # tunes and prepares outside the graph
            seconds = triton.testing.do_bench_cudagraph(lambda: [layer(x) for layer in layers]) / 1e3 / len(layers)
            layer = layers[0]
            moved = gptq_bytes(layer) + 2 * (k + n)
            rows.append(dict(shape=f"{k}x{n}", count=len(layers), us=seconds * 1e6, tbps=moved / seconds / 1e12,
                             pct_copy=100 * moved / seconds / bandwidth))
    return rows


def _fits(args: ModelArgs, bits: int, ctx: int, device) -> bool:
    need = floor_bytes(args, bits, 128, ctx)["total"] + 2.0 * args.vocab_size * args.dim
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.92 * free


def _measure(label: str, build, args: ModelArgs, bits: int, group_size: int, prompt: int, gen: int, ctx: int,
             decode_start: int | None, bandwidth: float, device, kernels: bool = False, kv_cache: str = "fp16",
             prefill_graphs: bool = False) -> dict:
    """Build a model variant, time it, free it; the row of the report."""
    torch.cuda.empty_cache()
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    history = os.environ.get("TALIS_MEMORY_HISTORY")  # a file: this row's allocations, for scripts/memory_peak.py
    if history:
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    built = {}
    model = build()
    mark_memory(built, "build")
    timing = time_model(model, prompt, gen, ctx, decode_start=decode_start, kv_cache=kv_cache,
                        prefill_graphs=prefill_graphs)
    if history:
        torch.cuda.memory._dump_snapshot(history)
        torch.cuda.memory._record_memory_history(enabled=None)
    head = gptq_bytes(model.lm_head) if isinstance(model.lm_head, QuantLinear) else None
    floor = floor_bytes(args, bits, group_size, decode_context(ctx, gen, decode_start), head, kv_cache)
    decode_tps = gen / timing["decode_s"]
    prefill_s = timing["prefill_s"]
    row = dict(variant=label, decode_tok_s=decode_tps, prefill_tok_s=prompt / prefill_s if prefill_s else None,
               ttft_ms=prefill_s * 1e3 if prefill_s else None, prefill_error=timing["prefill_error"],
               prefill_graph_ms=timing["prefill_graph_s"] * 1e3 if timing.get("prefill_graph_s") else None,
               ms_per_token=timing["decode_s"] / gen * 1e3,
               floor_tok_s=bandwidth / floor["total"], pct_floor=100 * decode_tps * floor["total"] / bandwidth,
               bytes_per_token_gb=floor["total"] / GB,
               peak_vram_gb=sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) / GB,  # all GPUs of a split
               peak_by_gpu_gb=[torch.cuda.max_memory_allocated(gpu) / GB for gpu in gpus],
               memory_gb={**built, **timing.get("memory_gb", {})})
    if kernels:
        row["kernels"] = gemv_table(model, bandwidth)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_bench(shape: str | None = None, model: str | None = None, prompt: int = 128, gen: int = 128,
              ctx: int | None = None, bits: int = 4, group_size: int = 128, act_order: bool = False,
              json_out: bool = False, kernels: bool = False, device_map: str | None = None,
              tokenizer: str | None = None, max_memory: str | None = None, tensor_parallel: int | None = None,
              baselines: bool = True, decode_start: int | None = None, kv_cache: str = "fp16",
              prefill_graphs: bool = False) -> dict:
    """Time one model and its baselines; returns the report (see `format_report`). `json_out` is the caller's
    choice of printer and changes nothing here.

    A --shape with `device_map` and/or `max_memory` is planned as `generate` plans a checkpoint and built directly
    on its GPUs (errors before anything is built); `tensor_parallel` N times the shape over N GPUs, one process
    each (talis_cli.tensor_parallel.bench). `baselines` False skips the fp16 and int4 rows. `decode_start`: the
    first cache slot of the decode window (default ctx - gen), so a long prefill and a short-context decode can be
    timed in one run. `kv_cache`: the KV cache type of every row ("fp16", "int8" or "fp8"; peak_vram_gb shows its
    memory). `prefill_graphs`: each row also times its prefill replayed as a CUDA graph (prefill_graph_ms; the
    graph's memory counts in peak_vram_gb).
    """
    check_kind(kv_cache)
    if torch.cuda.is_available():
        check_devices(kv_cache, range(torch.cuda.device_count()))

    if bits not in gptq_format.SUPPORTED_BITS:
        supported = ", ".join(map(str, gptq_format.SUPPORTED_BITS))
        raise UsageError(f"--bits {bits} is not supported; use one of {supported}")
    if (shape is None) == (model is None):
        raise UsageError("give exactly one of --shape (7B, 13B, ...) or --model DIR")
    if prompt < 1 or gen < 1:
        raise UsageError("--prompt and --gen must be at least 1")
    ctx = ctx or prompt + gen
    if ctx < prompt + gen:
        raise UsageError(f"--ctx {ctx} is smaller than --prompt + --gen ({prompt + gen}); raise it or shorten them")
    if decode_start is not None and not 0 < decode_start <= ctx - gen:
        raise UsageError(f"decode_start {decode_start} must lie in 1..ctx - gen ({ctx - gen})")
    if shape is not None:
        shape_args(shape, ctx)  # an unknown name: a usage error first, on any machine
    if not torch.cuda.is_available():
        raise TalisError("talis bench needs a CUDA GPU; none is visible here")
    if tensor_parallel is not None and tensor_parallel > 1:
        if shape is None or device_map or max_memory:
            raise UsageError("talis bench --tensor-parallel times a --shape (random weights on each GPU); "
                             "drop --model, --device-map and --max-memory")
        from .tensor_parallel.bench import run_tp_bench

        return run_tp_bench(tensor_parallel, shape, prompt, gen, ctx, bits, group_size, act_order, decode_start,
                            kv_cache)
    plan = None
    if shape is not None and (device_map or max_memory):  # before anything is built
        plan = plan_shape(shape_args(shape, ctx), bits, group_size, ctx, device_map, max_memory, kv_cache)
    device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = copy_bandwidth(device)
    report = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, copy_tb_s=bandwidth / 1e12,
                  prompt=prompt, gen=gen, ctx=ctx, bits=bits, group_size=group_size, act_order=act_order,
                  kv_cache=kv_cache, rows=[], notes=[])
    if model is not None:
        engine = _load_engine(model, ctx, device_map, tokenizer, max_memory, kv_cache)
        args, bits, group_size = engine.args, engine.quant.bits, engine.quant.group_size
        report.update(model=str(model), bits=bits, group_size=group_size, load_s=engine.load_s,
                      load_phases=engine.load_phases.phases)
        build_ours = lambda: engine.model  # noqa: E731
    else:
        args = shape_args(shape, ctx)
        report["shape"] = shape.upper()
        where = plan or device  # a split plan: each part built on its GPU
        build_ours = lambda: random_model(args, "gptq", bits, group_size, act_order, where)  # noqa: E731
        if plan is not None:
            report["plan"] = plan_summary(plan, args.n_layers)
    common = dict(args=args, prompt=prompt, gen=gen, ctx=ctx, bandwidth=bandwidth, device=device,
                  decode_start=decode_start, kv_cache=kv_cache, prefill_graphs=prefill_graphs)
    report["rows"].append(_measure(f"talis gptq {bits}-bit g{group_size}", build_ours, bits=bits,
                                   group_size=group_size, kernels=kernels, **common))
    if model is not None:
        del engine, build_ours
    if not baselines or plan is not None:
        report["notes"].append("baselines skipped" + (" (a split model)" if baselines else ""))
        return report
    if _fits(args, 16, ctx, device):
        report["rows"].append(_baseline("fp16 cuBLAS", "fp16", 16, -1, common))
    else:
        report["notes"].append("fp16 baseline skipped: its weights do not fit in free GPU memory")
    if hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        report["rows"].append(_baseline("torch int4 g128 (tinygemm)", "int4", 4, 128, common))
    return report


def _baseline(label: str, kind: str, bits: int, group_size: int, common: dict) -> dict:
    """A baseline row, or its label with the error when it cannot run here (out of memory, an old torch)."""
    try:
        return _measure(label, lambda: random_model(common["args"], kind, bits, group_size, False, common["device"]),
                        bits=bits, group_size=group_size, **common)
    except (RuntimeError, TypeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    gc.collect()  # the failed model is garbage only once the exception is gone
    torch.cuda.empty_cache()
    return dict(variant=label, error=error)


def decode_context(ctx: int, gen: int, decode_start: int | None) -> float:
    """The mean cached context of the decode window (the floor's KV term)."""
    return (ctx - gen if decode_start is None else decode_start) + gen / 2


def plan_summary(plan, n_layers: int) -> str:
    """'cuda:0 layers 0-39 (+embed), cuda:1 layers 40-79 (+norm, lm_head)': where a plan puts the parts."""
    runs: list[list] = []
    for i in range(n_layers):
        device = plan.device_for(f"model.layers.{i}")
        if runs and runs[-1][0] == device:
            runs[-1][2] = i
        else:
            runs.append([device, i, i])
    return ", ".join(f"{d} layers {a}-{b}" for d, a, b in runs)


def _load_engine(model_dir: str, ctx: int, device_map: str | None, tokenizer: str | None = None,
                 max_memory: str | None = None, kv_cache: str = "fp16"):
    engine = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=ctx, device_map=device_map or "auto",
                                      tokenizer=tokenizer, max_memory=max_memory, kv_cache=kv_cache))
    if engine.quant is None:
        raise TalisError(f"{model_dir} holds fp16 weights; talis bench measures GPTQ models (use --shape for fp16 baselines)")
    return engine


# --- printing ----------------------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    """The report as a few lines of text (what `talis bench` prints without --json)."""
    what = report.get("shape") or report.get("model")
    lines = [f"{what}  {report['bits']}-bit g{report['group_size']}{' act-order' if report['act_order'] else ''}  "
             f"prompt {report['prompt']}  gen {report['gen']}  ctx {report['ctx']}"
             + (f"  KV cache {report['kv_cache']}" if report.get("kv_cache", "fp16") != "fp16" else ""),
             f"{report['device']}, torch {report['torch']}, copy bandwidth {report['copy_tb_s']:.2f} TB/s", "",
             f"{'variant':<28} {'decode tok/s':>12} {'% floor':>8} {'prefill tok/s':>13} {'TTFT ms':>8} "
             f"{'GB/token':>8} {'peak GB':>8}"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"{row['variant']:<28} unavailable: {row['error']}")
            continue
        prefill = (f"{row['prefill_tok_s']:>13.0f} {row['ttft_ms']:>8.1f}" if row["prefill_tok_s"]
                   else f"{'failed':>13} {'-':>8}")
        lines.append(f"{row['variant']:<28} {row['decode_tok_s']:>12.1f} {row['pct_floor']:>7.1f}% {prefill} "
                     f"{row['bytes_per_token_gb']:>8.2f} {row['peak_vram_gb']:>8.1f}")
    for row in report["rows"]:
        if row.get("kernels"):
            lines += ["", f"{'GEMV shape (K x N)':<20} {'layers':>6} {'us':>8} {'TB/s':>6} {'% copy':>7}"]
            lines += [f"{k['shape']:<20} {k['count']:>6} {k['us']:>8.1f} {k['tbps']:>6.2f} {k['pct_copy']:>6.1f}%"
                      for k in row["kernels"]]
            total_us = sum(k["us"] * k["count"] for k in row["kernels"])
            lines.append(f"all GEMVs of one token: {total_us / 1e3:.3f} ms of {row['ms_per_token']:.3f} ms per token")
    lines += [f"note: {r['variant']} prefill failed: {r['prefill_error']}" for r in report["rows"] if r.get("prefill_error")]
    lines += [f"{r['variant']}: prefill as a CUDA graph {report['prompt'] / r['prefill_graph_ms'] * 1e3:.0f} tok/s, "
              f"TTFT {r['prefill_graph_ms']:.1f} ms" for r in report["rows"] if r.get("prefill_graph_ms")]
    for row in report["rows"]:
        if row.get("memory_gb"):
            lines.append(f"{row['variant']}: GB allocated / peak so far after " + ", ".join(
                f"{phase} {now:.2f} / {peak:.2f}" for phase, (now, peak) in row["memory_gb"].items()))
    for row in report["rows"]:
        if len(row.get("peak_by_gpu_gb") or []) > 1:
            lines.append(f"{row['variant']}: peak GB per GPU " + ", ".join(
                f"cuda:{i} {gb:.1f}" for i, gb in enumerate(row["peak_by_gpu_gb"])))
    if report.get("load_phases"):  # --model: the engine's load, CUDA graphs (the first bucket only) apart
        lines.append(f"load {report['load_s']:.2f} s: " + ", ".join(
            f"{name} {seconds:.2f}" for name, seconds in report["load_phases"].items()))
    if report.get("plan"):
        lines.append(f"plan: {report['plan']}")
    if report.get("allreduce"):
        from .tensor_parallel.bench import format_allreduce

        lines += format_allreduce(report)
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
