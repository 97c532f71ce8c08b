"""Where one decode step's time goes: CUDA kernels of the CUDA-graph decode step of a random model, by name.

    PYTHONPATH=. python3 scripts/profile_decode.py [--shape 7B] [--ctx 256] [--steps 20] [--bits 4] [--act-order]
                                                   [--rows 8]

--rows N (N > 1) profiles the server's step instead: N rows at their own positions (CudaGraphDecoder.decode_rows,
as talis_cli.scheduler runs it), each step's tokens read on the host before the next.

Prints, per kernel name, launches per step, GPU microseconds per step and share of the step, plus the wall time
per step of plain replays (the best of three runs of --steps steps). With programmatic dependent launch
(quant_kernels.pdl) kernels overlap, so the kernel times may add up to more than the step; the column "adds"
is what each kernel adds to the step instead: the time from the end of the kernel before it to its own end
(kernels of one stream end in order), summed per name, so the column adds up to the GPU time of the step.
"""
import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from talis_cli.bench import random_model, shape_args
from talis_cli.fast_decode import CudaGraphDecoder
from talis_cli.step_queue import greedy_decode


def add_model_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options that pick the random model and the decode window (shared with scripts/ab_decode.py)."""
    parser.add_argument("--shape", default="7B")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-order", action="store_true")


def random_decode_model(opts, device: torch.device):
    """A random GPTQ model of opts.shape on `device` with a one-row cache of opts.ctx slots."""
    model = random_model(shape_args(opts.shape, opts.ctx), "gptq", opts.bits, 128, opts.act_order, device)
    model.setup_cache(1, opts.ctx)
    return model


def label(name: str, seen: dict, n_layers: int) -> str:
    """The kernel's name, with its role in the layer for the GEMVs and norms (by how many of that kernel came
    before it, counted in `seen`): a step runs 4 GEMVs per layer and 2 norms per layer plus the final one, in the
    order of fast_decode.DecodeStep.run."""
    for kernel, per_step, roles in (("_gemv_kernel", 4 * n_layers, ("qkv", "o", "gate_up", "down")),
                                    ("_skinny_kernel", 4 * n_layers, ("qkv", "o", "gate_up", "down")),
                                    ("_rms_norm_kernel", 2 * n_layers + 1, ("input", "post_attention"))):
        if kernel in name:
            index = seen[kernel] % per_step
            seen[kernel] += 1
            role = "final" if kernel == "_rms_norm_kernel" and index == per_step - 1 else roles[index % len(roles)]
            return f"{kernel} ({role})"
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser, steps=20)
    parser.add_argument("--rows", type=int, default=1, help="rows at their own positions (the server's step)")
    opts = parser.parse_args()
    device = torch.device("cuda")
    model = random_decode_model(opts, device)
    if opts.rows > 1:
        model.setup_cache(opts.rows + 1, opts.ctx)  # and the spare row
    runner = CudaGraphDecoder(model)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    start = opts.ctx - opts.steps

    def steps():  # as `talis bench` decodes: each token read after the next step is queued
        greedy_decode(runner, token[:, 0], range(start, opts.ctx), device)

    if opts.rows > 1:
        def steps():  # noqa: F811 (as the scheduler steps, without its pipelining)
            tokens, rows = torch.zeros(opts.rows, dtype=torch.long), torch.arange(opts.rows)
            for slot in range(start, opts.ctx):
                runner.decode_rows(tokens, torch.full((opts.rows,), slot), rows).argmax(-1).tolist()

    with torch.inference_mode():
        steps()  # tunes and captures
        torch.cuda.synchronize()
        walls = []
        for _ in range(3):
            began = time.perf_counter()
            steps()
            walls.append((time.perf_counter() - began) / opts.steps * 1e6)
        wall_us = min(walls)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            steps()
    totals, counts, adds = defaultdict(float), defaultdict(int), defaultdict(float)
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.end)
    previous_end, seen = None, defaultdict(int)
    for event in kernels:
        name = label(event.name, seen, len(model.model.layers))
        totals[name] += event.device_time
        counts[name] += 1
        if previous_end is not None:
            adds[name] += event.time_range.end - max(previous_end, event.time_range.start)
        previous_end = event.time_range.end
    print(f"{opts.shape} {opts.bits}-bit{' act-order' if opts.act_order else ''} ctx {opts.ctx}, {opts.rows} rows: "
          f"{wall_us:.0f} us "
          f"per step = {1e6 / wall_us:.1f} tok/s (wall, with a host read per token; runs: "
          + ", ".join(f"{w:.0f}" for w in walls) + ")")
    print(f"{'us/step':>8} {'share':>6} {'adds':>7} {'n/step':>6}  kernel")
    for name, us in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{us / opts.steps:8.1f} {100 * us / opts.steps / wall_us:5.1f}% {adds[name] / opts.steps:7.1f} "
              f"{counts[name] / opts.steps:6.1f}  {name[:90]}")
    print(f"GPU busy per step (sum of adds): {sum(adds.values()) / opts.steps:.0f} us")


if __name__ == "__main__":
    main()
