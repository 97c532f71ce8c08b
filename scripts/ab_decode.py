"""Compare variants of the CUDA-graph decode step on one random model, in one process, rounds interleaved.

    PYTHONPATH=. python3 scripts/ab_decode.py [--shape 7B] [--ctx 256] [--steps 100] [--rounds 5] VARIANT ...

A VARIANT is names joined by '+' from SWITCHES (environment variables the kernels read when the step is
captured): `base` (defaults), `pdl0` (no programmatic dependent launch), `attn2` / `attn4` / `attn0` (decode
attention split for 2 or 4 programs per SM instead of 1, or not split); e.g. `base pdl0 attn2`.
`inline` is no switch but the loop of earlier versions: each token read on the host before the next step is
queued (by default the next step is queued first, as the Generator does on CUDA: talis_cli.step_queue). A switch
for a new code path goes into SWITCHES, so that it is measured against the default in one process.
Step times of one build of the weights vary by a few percent from run to run and from machine to machine, so
variants are only compared against each other here: each round times every variant once, in turn. Prints each
variant's best and median step (wall, with the host read of each token) and its speed relative to the first.
"""
import argparse
import os
import statistics
import time

import torch

from profile_decode import add_model_options, random_decode_model  # scripts/ is on the path of scripts run
from talis_cli.fast_decode import CudaGraphDecoder
from talis_cli.step_queue import greedy_decode

SWITCHES = {  # name: (environment variable, value when on, default)
    "pdl0": ("TALIS_PDL", "0", "1"),
    "attn2": ("TALIS_ATTENTION_PROGRAMS_PER_SM", "2", "1"),
    "attn4": ("TALIS_ATTENTION_PROGRAMS_PER_SM", "4", "1"),
    "attn0": ("TALIS_ATTENTION_PROGRAMS_PER_SM", "0", "1"),  # no split: one program per head
}


INLINE = "inline"


def apply(variant: str) -> None:
    """Set the switches of `variant` (and reset the others to their defaults)."""
    names = set(variant.split("+")) - {"base", INLINE}
    unknown = names - set(SWITCHES)
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)}; known: base, {INLINE}, {', '.join(SWITCHES)}")
    for variable, _, default in SWITCHES.values():
        os.environ[variable] = default
    for name in names:
        variable, on, _ = SWITCHES[name]
        os.environ[variable] = on


def decode_inline(runner, positions: range) -> None:
    """Greedy steps at `positions`, each token read on the host before the next step is queued."""
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    for pos in positions:
        token = runner(token[:, None], pos).argmax(-1)
        token.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    add_model_options(parser, steps=100)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    device = torch.device("cuda")
    model = random_decode_model(opts, device)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    start = opts.ctx - opts.steps

    runners = {}
    with torch.inference_mode():
        for variant in opts.variants:  # capture each variant under its own switches
            apply(variant)
            runners[variant] = CudaGraphDecoder(model)
            runners[variant](token, start)
        times = {v: [] for v in opts.variants}
        for _ in range(opts.rounds):
            for variant, runner in runners.items():
                torch.cuda.synchronize()
                began = time.perf_counter()
                if INLINE in variant.split("+"):
                    decode_inline(runner, range(start, opts.ctx))
                else:
                    greedy_decode(runner, torch.zeros(1, dtype=torch.long, device=device), range(start, opts.ctx),
                                  device)
                times[variant].append((time.perf_counter() - began) / opts.steps * 1e6)
    apply("base")
    first = min(times[opts.variants[0]])
    print(f"{opts.shape} {opts.bits}-bit{' act-order' if opts.act_order else ''} ctx {opts.ctx}, "
          f"{opts.rounds} rounds of {opts.steps} steps ({torch.cuda.get_device_name(device)})")
    for variant, runs in times.items():
        best = min(runs)
        print(f"  {variant:24s} best {best:7.0f} us = {1e6 / best:6.1f} tok/s, "
              f"median {statistics.median(runs):7.0f} us, {100 * first / best:5.1f}% of the first's speed")


if __name__ == "__main__":
    main()
