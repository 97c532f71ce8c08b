"""Where a prefill's time goes: CUDA kernels of one prompt's forward on a random model, by name.

    PYTHONPATH=. python3 scripts/profile_prefill.py [--shape 7B] [--prompts 128,2048] [--bits 4] [--act-order]
                                                    [--paths fast,graphs,eager]

For each prompt length and path: the wall time of the prefill (median of 5, first token on the host, as `talis
bench` times it) and, from one profiled run, the GPU time per kernel name and its share, so the gap to fp16 cuBLAS
shows where it is (dequantize, GEMM, attention, norms, launches). A wall time well above the GPU busy time means
the host's launches are the limit. Paths: "fast" is what `talis generate` prefills one prompt with on a GPU
(talis_cli.fast_prefill, plugged into the Generator by fast_decode.accelerate), "graphs" the same replayed as a
CUDA graph for prompts up to 512 tokens (captured at the second prompt of a length bucket: the first timed run
here; what generate runs from a bucket's second prompt), "eager" the plain Transformer.forward.
"""
import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from talis_cli.bench import random_model, shape_args
from talis_cli.fast_prefill import prefill_runner


def eager(model):
    """Transformer.forward as a prefill: (tokens [1, T], start_pos) -> logits [1, 1, vocab]."""
    return lambda tokens, start_pos: model(tokens, start_pos=start_pos, last_only=True)


def packed(runner, count: int):
    """`count` copies of a prompt as segments of one forward, each into its own cache row: (tokens [1, T],
    start_pos) -> logits [count, 1, vocab]."""
    def prefill(tokens, start_pos):
        ids = tokens[0].tolist()
        return runner.prefill_segments([(ids, start_pos, row) for row in range(count)])[:, None]
    return prefill


def prefill_s(prefill, tokens) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prefill(tokens, 0)[:, -1].argmax(-1).tolist()
    return time.perf_counter() - t0


def kernel_table(prefill, tokens, top: int) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill_s(prefill, tokens)
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name][0] += 1
            per_name[event.name][1] += event.device_time
    total = sum(us for _, us in per_name.values()) or 1.0
    rows = sorted(per_name.items(), key=lambda item: -item[1][1])[:top]
    lines = [f"    GPU busy {total / 1e3:.2f} ms"]
    lines += [f"    {us / 1e3:8.3f} ms {100 * us / total:5.1f}%  x{count:<5} {name[:90]}" for name, (count, us) in rows]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7B")
    parser.add_argument("--prompts", default="128,2048")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--segments", type=int, default=0, help="also time N prompts of each length packed into "
                        "one forward, each into its own cache row (what a server's newcomers of one step run)")
    parser.add_argument("--paths", default="fast,graphs,eager", help="comma-separated: fast (what generate uses), "
                        "graphs (the same replayed as CUDA graphs up to 512 tokens), eager")
    opts = parser.parse_args()
    paths = opts.paths.split(",")
    prompts = [int(p) for p in opts.prompts.split(",")]
    device = torch.device("cuda")
    for kind in ("gptq", "fp16"):
        model = random_model(shape_args(opts.shape, max(prompts)), kind, opts.bits, 128, opts.act_order, device)
        model.setup_cache(max(1, opts.segments), max(prompts))
        runners = {"fast": prefill_runner(model), "graphs": prefill_runner(model, graphs=True), "eager": eager(model)}
        if opts.segments:
            runners["packed"] = packed(runners["fast"], opts.segments)
            paths.append("packed") if "packed" not in paths else None
        with torch.inference_mode():
            for prompt in prompts:
                tokens = torch.randint(0, model.args.vocab_size, (1, prompt), device=device)
                for path in paths:
                    prefill = runners[path]
                    prefill_s(prefill, tokens)  # compiles and tunes
                    seconds = statistics.median(prefill_s(prefill, tokens) for _ in range(5))
                    count = opts.segments if path == "packed" else 1
                    print(f"{opts.shape} {kind} {path} prefill {count} x {prompt}: {seconds * 1e3:.2f} ms, "
                          f"{count * prompt / seconds:,.0f} tok/s")
                    print("\n".join(kernel_table(prefill, tokens, opts.top)))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
