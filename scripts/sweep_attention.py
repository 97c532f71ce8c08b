"""Time the decode attention kernel over launch choices at serving batch sizes, on the GPU.

    PYTHONPATH=. python3 scripts/sweep_attention.py [--shape 7B] [--rows 1,4,8,16,32] [--capacity 256,2048]
                                                    [--layers 32] [--json FILE] [--baseline MODULE]

For each (rows, capacity): a cache per layer (fp16, one cache row per batch row, so no layer's keys sit in L2
when the next reads), each row at its own random slot in the upper half of the capacity (as a server's rows
are), and one CUDA graph of one attention launch per layer, replayed. Every launch choice
(quant_kernels.triton_ops.AttentionLaunch: block, warps, pipeline stages, programs per SM, shortest chunk) is
checked against the default launch's output first, then timed: microseconds per launch and the GB/s of the cache
it reads. Prints the default and the best per (rows, capacity); --json writes every timing. --baseline times
another module's decode_attention at its own default launch (an earlier version kept aside, for an A/B in one
run).
"""
import argparse
import importlib
import itertools
import json

import torch

from quant_kernels import triton_ops as ops
from talis_cli.bench import SHAPES

BLOCKS = [  # (block, warps, stages)
    (64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 4, 5), (64, 8, 3), (128, 4, 2), (128, 8, 2), (16, 4, 4)]
PER_SM = [1, 2, 4, 8]
MIN_CHUNKS = [32, 64, 128]


def cases(opts):
    """(rows, capacity) pairs to time."""
    return itertools.product(map(int, opts.rows.split(",")), map(int, opts.capacity.split(",")))


def time_launch(layers, inputs, rows, capacity, launch, replays=20, module=ops) -> float:
    """Microseconds per attention launch: one CUDA graph of a launch per layer, replayed."""
    options = dict(launch=launch) if launch else {}

    def step():
        for k_cache, v_cache in layers:
            module.decode_attention(*inputs, k_cache, v_cache, capacity, rows=rows, **options)
    for _ in range(2):  # compile and fill the ticket buffer outside the capture
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7B")
    parser.add_argument("--rows", default="1,4,8,16,32")
    parser.add_argument("--capacity", default="256,2048")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--json")
    parser.add_argument("--baseline")
    opts = parser.parse_args()
    baseline = importlib.import_module(opts.baseline) if opts.baseline else None
    shape = SHAPES[opts.shape.upper()]
    hd, heads, kv_heads = shape.dim // shape.n_heads, shape.n_heads, shape.n_kv_heads
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    for B, capacity in cases(opts):
        layers = [(torch.randn(B, kv_heads, capacity, hd, device=device, generator=gen, dtype=torch.float16),
                   torch.randn(B, kv_heads, capacity, hd, device=device, generator=gen, dtype=torch.float16))
                  for _ in range(opts.layers)]
        q = torch.randn(B, heads * hd, device=device, generator=gen, dtype=torch.float16)
        k = torch.randn(B, kv_heads * hd, device=device, generator=gen, dtype=torch.float16)
        v = torch.randn(B, kv_heads * hd, device=device, generator=gen, dtype=torch.float16)
        angles = torch.rand(capacity, hd, device=device, generator=gen) * 6.28
        cos, sin = angles.cos().half(), angles.sin().half()
        slots = torch.randint(capacity // 2, capacity, (B,), device=device, generator=gen)
        rows = torch.arange(B, device=device)
        pad = torch.zeros(B, dtype=torch.long, device=device)
        inputs = (q, k, v, cos, sin, slots, pad)
        read_bytes = int((slots + 1).sum()) * kv_heads * hd * 2 * 2
        default = ops.attention_launch(capacity, B * heads, sms)
        reference = ops.decode_attention(*inputs, *layers[0], capacity, rows=rows, launch=default)
        choices = {default}
        for (block, warps, stages), per_sm, min_chunk in itertools.product(BLOCKS, PER_SM, MIN_CHUNKS):
            choices.add(ops.attention_launch(capacity, B * heads, sms, block, warps, stages, per_sm, min_chunk))
        timed = []
        for launch in sorted(choices, key=lambda c: (c.block, c.warps, c.stages, c.splits)):
            out = ops.decode_attention(*inputs, *layers[0], capacity, rows=rows, launch=launch)
            error = (out.float() - reference.float()).abs().max().item()
            us = time_launch(layers, inputs, rows, capacity, launch)
            timed.append((us, launch, error))
            records.append(dict(rows=B, capacity=capacity, us=us, gbps=read_bytes / us / 1e3, error=error,
                                default=launch == default, **launch.__dict__))
        if baseline:
            out = baseline.decode_attention(*inputs, *layers[0], capacity, rows=rows)
            error = (out.float() - reference.float()).abs().max().item()
            us = time_launch(layers, inputs, rows, capacity, None, module=baseline)
            print(f"rows {B:3d} capacity {capacity:5d}: baseline {us:7.2f} us {read_bytes / us / 1e3:6.0f} GB/s "
                  f"max err {error:.1e}", flush=True)
            records.append(dict(rows=B, capacity=capacity, us=us, gbps=read_bytes / us / 1e3, error=error,
                                baseline=opts.baseline))
        timed.sort(key=lambda t: t[0])
        base = next(t for t in timed if t[1] == default)
        print(f"rows {B:3d} capacity {capacity:5d} ({read_bytes / 1e6:.1f} MB): default {base[0]:7.2f} us "
              f"{read_bytes / base[0] / 1e3:6.0f} GB/s {base[1]}", flush=True)
        for us, launch, error in timed[:4]:
            print(f"    {us:7.2f} us {read_bytes / us / 1e3:6.0f} GB/s max err {error:.1e} {launch}", flush=True)
        del layers
        torch.cuda.empty_cache()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
