"""On the two-GPU machine, in one call (< 8 minutes): each timing run in a process of its own, its report appended as
a JSON line to DIR/tp_bench.jsonl, then the tensor-parallel and split tests (on the kernels the runs tuned), and a
summary with the ratios.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_check_tp.py [--no-tests] [--out DIR] [--budget SECONDS]

Runs (decode: 128 greedy tokens at cache slots 128..255; prefill: 2048 tokens), in this order, each skipped once
the budget (less 150 s kept for the tests) would be exceeded:
  13B one GPU | 13B TP 2 (+ all-reduce table) | 70B one GPU | 70B TP 2 (+ all-reduce table) |
  70B split over 2 GPUs (layers 0-39, 40-79) | 13B split (0-19, 20-39) |
  65B split by --max-memory 0=24GiB,1=24GiB at a 2048-token context (prefill 1920, decode 1920..2047) |
  70B TP 2 with TALIS_TP_ALLREDUCE=nccl (A/B of the small-message path)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEST_FILES = ["tests/test_tensor_parallel.py", "tests/test_bench_split.py"]
DECODE = dict(prompt=2048, gen=128, ctx=2176, decode_start=128)
TESTS_RESERVE = 150.0  # seconds of the budget kept for the tests


def runs(out: Path) -> list[tuple[str, dict, dict]]:
    """(label, run_bench keyword arguments, extra environment) of every timing run, in order."""
    maps = {}
    for name, split in (("70B", {"0-39": 0, "40-79": 1}), ("13B", {"0-19": 0, "20-39": 1})):
        maps[name] = out / f"split_{name}.json"
        maps[name].write_text(json.dumps({"layers": split}))
    one = dict(baselines=False, **DECODE)
    return [
        ("13B one GPU", dict(shape="13B", **one), {}),
        ("13B TP2", dict(shape="13B", tensor_parallel=2, **DECODE), {}),
        ("70B one GPU", dict(shape="70B", **one), {}),
        ("70B TP2", dict(shape="70B", tensor_parallel=2, **DECODE), {}),
        ("70B split", dict(shape="70B", device_map=str(maps["70B"]), **one), {}),
        ("13B split", dict(shape="13B", device_map=str(maps["13B"]), **one), {}),
        ("65B 2x24GiB", dict(shape="65B", max_memory="0=24GiB,1=24GiB", prompt=1920, gen=128, ctx=2048,
                             baselines=False), {}),
        ("70B TP2 nccl", dict(shape="70B", tensor_parallel=2, **DECODE), {"TALIS_TP_ALLREDUCE": "nccl"}),
    ]


def run_one(kwargs: dict) -> None:
    """In a child process: one run_bench, its report as JSON on the last line of stdout."""
    from talis_cli.bench import format_report, run_bench

    report = run_bench(**kwargs)
    print(format_report(report), flush=True)
    print(json.dumps(report, default=str))


def summary(results: dict) -> list[str]:
    def row(label):
        report = results.get(label)
        return report["rows"][0] if report else None

    lines = ["[gpu_check_tp] summary: decode tok/s (slots 128..255), prefill tok/s (2048 tokens), peak GB per GPU"]
    for label, report in results.items():
        r = report["rows"][0]
        peaks = ", ".join(f"{gb:.1f}" for gb in r.get("peak_by_gpu_gb") or [])
        lines.append(f"  {label:<14} decode {r['decode_tok_s']:8.1f}  prefill {r['prefill_tok_s'] or float('nan'):8.0f}"
                     f"  peak [{peaks}]  small all-reduce: {report.get('allreduce_path', '-')}"
                     + ("  (decode WITHOUT CUDA graphs)" if report.get("decode_graphs") is False else ""))
    for shape in ("13B", "70B"):
        one, tp, split = row(f"{shape} one GPU"), row(f"{shape} TP2"), row(f"{shape} split")
        if one and tp:
            both = tp["prefill_tok_s"] and one["prefill_tok_s"]
            prefill = f"{tp['prefill_tok_s'] / one['prefill_tok_s']:.2f}x" if both else "n/a"
            lines.append(f"  {shape}: TP2 / one GPU decode {tp['decode_tok_s'] / one['decode_tok_s']:.2f}x "
                         f"(target {'1.6' if shape == '70B' else '1.4'}x), prefill {prefill} (target 1.6x)")
        if one and split:
            ratio = split["decode_tok_s"] / one["decode_tok_s"]
            lines.append(f"  {shape}: split / one GPU decode {ratio:.1%} (target >= 95%)")
    for label in ("13B TP2", "70B TP2"):
        for r in (results.get(label) or {}).get("allreduce") or []:
            graph = "failed" if r["graph_us"] is None else f"{r['graph_us']:.1f} us"
            lines.append(f"  all-reduce {label[:3]} run {r['path']:<8} {r['bytes'] // 1024:>3} KB  eager "
                         f"{r['eager_us']:.1f} us  graph {graph}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: a child's run_bench arguments (JSON)
    opts = parser.parse_args()
    if opts.one:
        run_one(json.loads(opts.one))
        return 0
    started = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    reserve = 0.0 if opts.no_tests else TESTS_RESERVE  # the tests run last, on kernels the runs have tuned
    results, cost = {}, {"13B": 40.0, "70B": 75.0, "65B": 75.0}  # rough seconds per run, to respect the budget
    for label, kwargs, env in runs(out):
        left = opts.budget - reserve - (time.perf_counter() - started)
        if left < cost[kwargs["shape"]]:
            print(f"[gpu_check_tp] {label}: SKIPPED ({left:.0f} s left of the budget)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(kwargs)], capture_output=True,
                                  text=True, env={**os.environ, **env}, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"[gpu_check_tp] {label}: cut at the budget", flush=True)
            status = 1
            continue
        wall = time.perf_counter() - t0
        sys.stdout.write(proc.stdout.rsplit("\n", 2)[0] + "\n" if proc.stdout else "")
        if proc.returncode != 0:
            print(f"[gpu_check_tp] {label}: FAILED (exit {proc.returncode}) in {wall:.0f} s\n{proc.stderr[-3000:]}",
                  flush=True)
            status = 1
            continue
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report.update(label=label, spec=kwargs, env=env, wall_s=wall)
        results[label] = report
        with (out / "tp_bench.jsonl").open("a") as f:
            f.write(json.dumps(report) + "\n")
        print(f"[gpu_check_tp] {label} took {wall:.0f} s\n", flush=True)
    if not opts.no_tests:
        t0 = time.perf_counter()
        try:
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES],
                                   timeout=max(60.0, opts.budget - (t0 - started)))
        except subprocess.TimeoutExpired:
            code = "timed out"
        print(f"[gpu_check_tp] tests exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or int(code != 0)
    print("\n".join(summary(results)), flush=True)
    print(f"[gpu_check_tp] total {time.perf_counter() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
