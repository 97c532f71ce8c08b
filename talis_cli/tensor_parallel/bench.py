"""`talis bench --tensor-parallel N --shape NAME`: a random GPTQ model of a named shape, each rank building only its
part on its own GPU (no file), timed as the one-GPU bench times it (prefill, then decode through the per-rank CUDA
graphs with the all-reduces inside), plus a microbenchmark of the all-reduce itself.

Every rank runs the same program (no rank drives another here): the same timing loop, so the collectives meet.
Rank 0 reports.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from quant_kernels.autotune_cache import graph_time_us

from ..errors import TalisError

GB = 1e9
ALLREDUCE_SIZES = (16 * 1024, 64 * 1024)  # bytes of fp16: a decode row of a 8192-wide model is 16 KB
CALLS_PER_GRAPH = 64


def run_tp_bench(size: int, shape: str, prompt: int, gen: int, ctx: int, bits: int, group_size: int,
                 act_order: bool, decode_start: int | None = None, kv_cache: str = "fp16") -> dict:
    """Spawn ranks 1..size-1, time on all; rank 0's report (format_report prints it)."""
    from . import launch, rank_devices

    devices = rank_devices(size, {})
    if devices is None:
        raise TalisError(f"talis bench --tensor-parallel {size} needs {size} CUDA GPUs; none is visible here")
    spec = dict(shape=shape, prompt=prompt, gen=gen, ctx=ctx, bits=bits, group_size=group_size, act_order=act_order,
                decode_start=decode_start, kv_cache=kv_cache)
    init_method = f"tcp://127.0.0.1:{launch.free_port()}"
    children = launch.Children(_bench_child, lambda r: (spec, r, size, init_method, devices[r]), size)
    try:
        return bench_rank(spec, 0, size, init_method, devices[0])
    except Exception:
        children.await_failure()  # another rank's failure is the message
        children.quiet()
        raise


def _bench_child(spec: dict, rank: int, size: int, init_method: str, device: str, pipe) -> None:
    from . import launch

    launch.child_main(lambda: bench_rank(spec, rank, size, init_method, device), pipe)


def bench_rank(spec: dict, rank: int, size: int, init_method: str, device: str) -> dict:
    """This rank's part of the run; the report on rank 0 (None elsewhere)."""
    from ..bench import copy_bandwidth, decode_context, floor_bytes, random_model, shape_args, time_model
    from .comm import AllReduce, init_world
    from .shard import Shard

    world = init_world(rank, size, device, init_method)
    gpu = torch.device(device)
    all_reduce = AllReduce(world)
    graphs = all_reduce.prepare(torch.float16)
    collectives = allreduce_table(world, all_reduce)
    args = shape_args(spec["shape"], spec["ctx"])
    shard = Shard(rank, size, device, bits=spec["bits"], group_size=spec["group_size"],
                  act_order=spec["act_order"], all_reduce=all_reduce)
    local = shard.local_args(args)
    bandwidth = copy_bandwidth(gpu)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(gpu)
    torch.manual_seed(rank)
    model = random_model(local, "gptq", spec["bits"], spec["group_size"], spec["act_order"], gpu)
    shard.wrap(model)
    timing = time_model(model, spec["prompt"], spec["gen"], spec["ctx"], decode_start=spec["decode_start"],
                        graphs=graphs, kv_cache=spec["kv_cache"])
    peaks = torch.zeros(size, device=gpu)
    peaks[rank] = torch.cuda.max_memory_allocated(gpu) / GB
    dist.all_reduce(peaks)
    dist.destroy_process_group()  # every rank is done with the collectives
    if rank != 0:
        return None
    gen, prompt = spec["gen"], spec["prompt"]
    # the bytes one rank reads per token: its 1/N of the layers and of the KV cache, the whole (replicated) lm_head
    floor = floor_bytes(local, spec["bits"], spec["group_size"], decode_context(spec["ctx"], gen, spec["decode_start"]),
                        kv_cache=spec["kv_cache"])
    decode_tps = gen / timing["decode_s"]
    prefill_s = timing["prefill_s"]
    row = dict(variant=f"talis gptq TP{size} {spec['bits']}-bit g{spec['group_size']}", decode_tok_s=decode_tps,
               prefill_tok_s=prompt / prefill_s if prefill_s else None, ttft_ms=prefill_s * 1e3 if prefill_s else None,
               prefill_error=timing["prefill_error"], ms_per_token=timing["decode_s"] / gen * 1e3,
               floor_tok_s=bandwidth / floor["total"], pct_floor=100 * decode_tps * floor["total"] / bandwidth,
               bytes_per_token_gb=floor["total"] / GB, peak_vram_gb=float(peaks.sum()),
               peak_by_gpu_gb=peaks.tolist())
    return dict(device=f"{size} x {torch.cuda.get_device_name(gpu)}", torch=torch.__version__,
                copy_tb_s=bandwidth / 1e12, prompt=prompt, gen=gen, ctx=spec["ctx"], bits=spec["bits"],
                group_size=spec["group_size"], act_order=spec["act_order"], kv_cache=spec["kv_cache"],
                shape=spec["shape"].upper(),
                tensor_parallel=size, allreduce_path=all_reduce.path, allreduce_error=all_reduce.one_shot_error,
                decode_graphs=graphs, capture_error=all_reduce.capture_error,
                allreduce=collectives, rows=[row],
                notes=[f"tensor parallel {size}: per-rank floor (1/{size} of the layers and KV cache, the whole "
                       f"lm_head); small all-reduces: {all_reduce.path}"
                       + (f" ({all_reduce.one_shot_error})" if all_reduce.one_shot_error else "")
                       + ("" if graphs else f"; decode WITHOUT CUDA graphs ({all_reduce.capture_error})")])


def allreduce_table(world, all_reduce) -> list[dict]:
    """Microseconds per all-reduce of fp16 vectors of ALLREDUCE_SIZES bytes: NCCL and the one-shot path, each
    eager (one call after another from the host) and inside a CUDA graph (CALLS_PER_GRAPH calls per replay)."""
    from .comm import OneShot

    rows = []
    one_shot = all_reduce.one_shot if all_reduce.path == "one-shot" else None
    if one_shot is None and world.on_gpu and os.environ.get("TALIS_TP_ALLREDUCE", "auto") != "nccl":
        one_shot = all_reduce._one_shot(torch.float16)  # noqa: SLF001  (the same set-up the layers get)
    paths = {"nccl": lambda y: (dist.all_reduce(y, group=world.group), y)[1]}
    if isinstance(one_shot, OneShot):
        paths["one-shot"] = one_shot
    for nbytes in ALLREDUCE_SIZES:
        y = torch.ones(nbytes // 2, dtype=torch.float16, device=world.device)
        for name, fn in paths.items():
            rows.append(dict(path=name, bytes=nbytes, eager_us=_eager_us(fn, y), graph_us=_graph_us(fn, y)))
    return rows


def _eager_us(fn, y, calls: int = 200) -> float:
    for _ in range(10):
        fn(y)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(y)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _graph_us(fn, y, replays: int = 20) -> float | None:
    """Microseconds per call of fn(y) replayed in a CUDA graph of CALLS_PER_GRAPH calls (warm L2: what a decode
    step's all-reduces see), after one eager call on a side stream; None where the collective does not capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(y)
    torch.cuda.current_stream().wait_stream(stream)
    try:
        return graph_time_us(lambda: fn(y), cold_l2=False, launches=CALLS_PER_GRAPH, replays=replays)
    except RuntimeError:
        return None


def format_allreduce(report: dict) -> list[str]:
    """Lines of the all-reduce table of a tensor-parallel report."""
    lines = ["", f"{'all-reduce':<10} {'bytes':>7} {'eager us':>9} {'graph us':>9}"]
    for r in report.get("allreduce") or []:
        graph = f"{r['graph_us']:>9.1f}" if r["graph_us"] is not None else f"{'failed':>9}"
        lines.append(f"{r['path']:<10} {r['bytes']:>7} {r['eager_us']:>9.1f} {graph}")
    return lines
