"""On the GPU machine, in one call: the GPU tests of the fast path, then `talis bench` for each spec.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py [--no-tests] [--out DIR] SPEC ...

SPEC is run_bench's keyword arguments as key=value pairs joined by commas, e.g. `shape=7B,kernels=1` or
`shape=65B,prompt=2048,gen=64,ctx=2112`; `kv=int8` (short for kv_cache=int8; fp8 is refused on GPUs for now)
runs every row of that spec with that KV cache, so `shape=7B,kv=int8` benches decode and reports peak memory with it;
`prefill_graphs=1` also times each row's prefill replayed as a CUDA graph (prompts up to 512 tokens). A SPEC may also be a
name of NAMED_SPECS: `kv65b` is the 65B shape at 2048 context with the int8 cache, whose peak GB the summary
compares with the issue's target (<= 38 GB). Each report is printed as it finishes and appended as one JSON line to
DIR/bench.jsonl (DIR defaults to $OUT, else the current folder), so a run cut short keeps what it measured.
`TALIS_MEMORY_HISTORY=FILE` records a row's allocations there, each row overwriting the one before (scripts/memory_peak.py
FILE names what was live at the peak). `--dry` prints the keyword arguments of each SPEC and exits (no GPU needed). `--serve` adds scripts/bench_serve.py
on a random 7B with and without the scheduler's packed prefill; it needs the server's packages (fastapi, uvicorn,
httpx, prometheus-client), which the GPU machine lacks: carry their wheels and install them first.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_fast_decode.py", "tests/test_triton_ops.py",
              "tests/test_bench.py", "tests/test_generation.py", "tests/test_device_planning.py",
              "tests/test_step_queue.py", "tests/test_sliding_window.py", "tests/test_rope_scaling.py",
              "tests/test_quantized_head.py", "tests/test_fast_prefill.py", "tests/test_kv_cache.py",
              "tests/test_lazy_graphs.py", "tests/test_tuned_table.py", "tests/test_decode_rows.py",
              "tests/test_scheduler.py", "tests/test_cli.py", "tests/test_quant_linear.py"]
INT_KEYS = {"prompt", "gen", "ctx", "bits", "group_size", "decode_start"}
BOOL_KEYS = {"act_order", "kernels", "baselines", "prefill_graphs"}
KEY_ALIASES = {"kv": "kv_cache"}
# name -> (spec, peak GB target or None). kv65b: a 2048-slot cache, decode in its last 64 slots after a short
# prefill (the prefill's activations would otherwise set the peak), no baselines (fp16 weights do not fit in 40 GB).
NAMED_SPECS = {"kv65b": ("shape=65B,kv=int8,prompt=128,gen=64,ctx=2048,baselines=0", 38.0)}


def parse_spec(spec: str) -> dict:
    """'shape=7B,ctx=2048,act_order=1,kv=int8' (or a NAMED_SPECS name) -> run_bench keyword arguments."""
    spec = NAMED_SPECS.get(spec, (spec, None))[0]
    kwargs = {}
    for pair in filter(None, spec.split(",")):
        key, _, value = pair.partition("=")
        key = KEY_ALIASES.get(key, key)
        if key in INT_KEYS:
            kwargs[key] = int(value)
        elif key in BOOL_KEYS:
            kwargs[key] = value not in ("0", "false", "")
        else:
            kwargs[key] = value
    return kwargs


def run_tests() -> int:
    started = time.perf_counter()
    # only the GPU tests: the others assume Triton's interpreter, which is on only where there is no GPU
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *TEST_FILES])
    print(f"[gpu_check] tests exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry", action="store_true", help="print each SPEC's run_bench arguments and exit")
    parser.add_argument("--serve", action="store_true",
                        help="also scripts/bench_serve.py on a random 7B (clients 1, 8, 16, 32; max batch 16), with "
                             "the packed prefill and without it (TALIS_PACKED_PREFILL=0)")
    opts = parser.parse_args()
    if opts.dry:
        for spec in opts.specs:
            print(f"{spec}: {parse_spec(spec)}")
        return 0
    status = 0 if opts.no_tests else run_tests()

    from talis_cli.bench import format_report, run_bench

    log = Path(opts.out) / "bench.jsonl"
    summaries = []
    for spec in opts.specs:
        started = time.perf_counter()
        try:
            report = run_bench(**parse_spec(spec))
        except Exception:
            traceback.print_exc()
            summaries.append(f"{spec}: FAILED")
            status = status or 1
            continue
        report["spec"], report["wall_s"] = spec, time.perf_counter() - started
        with log.open("a") as f:
            f.write(json.dumps(report) + "\n")
        print(format_report(report), f"\n[gpu_check] {spec} took {report['wall_s']:.0f} s\n", flush=True)
        ours = report["rows"][0]
        target = NAMED_SPECS.get(spec, (None, None))[1]
        verdict = "" if target is None else (f" ({'within' if ours['peak_vram_gb'] <= target else 'OVER'} the "
                                             f"{target:.0f} GB target; {expected_memory(report)})")
        summaries.append(f"{spec}: {ours['decode_tok_s']:.0f} tok/s ({ours['pct_floor']:.0f}% floor), prefill "
                         f"{ours['prefill_tok_s'] or float('nan'):.0f} tok/s, peak {ours['peak_vram_gb']:.2f} GB"
                         f"{verdict}; "
                         "baselines " + ", ".join(f"{r['variant']} {r.get('decode_tok_s') or float('nan'):.0f}/"
                                                  f"{r.get('prefill_tok_s') or float('nan'):.0f}"
                                                  for r in report["rows"][1:]))
    if opts.serve:
        status = run_serve(log) or status
    print("\n".join(["[gpu_check] summary (decode tok/s / prefill tok/s for baselines)"] + summaries))
    return status


def expected_memory(report: dict) -> str:
    """What talis_cli.memory_breakdown expects of a --shape report's first row (static and peak, GB = 10^9)."""
    from talis_cli.bench import shape_args
    from talis_cli.memory_breakdown import expected_peak, parts, static_bytes

    if "shape" not in report:
        return "no breakdown for --model runs"
    breakdown = parts(shape_args(report["shape"], report["ctx"]), report["bits"], report["group_size"],
                      report["ctx"], report["kv_cache"], report["prompt"], report["act_order"])
    return (f"memory_breakdown: static {static_bytes(breakdown) / 1e9:.2f} GB, expected peak "
            f"{expected_peak(breakdown) / 1e9:.2f} GB")


def run_serve(log: Path) -> int:
    """bench_serve.py twice on one random 7B folder, its JSON reports appended to `log`; exit status."""
    import tempfile

    status = 0
    script = Path(__file__).parent
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "random-7B"
        subprocess.run([sys.executable, str(script / "random_checkpoint.py"), "--shape", "7B", "--out", str(folder)],
                       check=True, stdout=subprocess.DEVNULL)
        for packed in ("1", "0"):
            env = {**os.environ, "TALIS_PACKED_PREFILL": packed}
            done = subprocess.run([sys.executable, str(script / "bench_serve.py"), "--model", str(folder), "--clients",
                                   "1,8,16,32", "--max-batch", "16", "--json"], env=env, capture_output=True,
                                  text=True)
            if done.returncode:
                print(done.stderr[-3000:], flush=True)
                status = done.returncode
                continue
            report = {"serve": True, "packed_prefill": packed == "1", **json.loads(done.stdout.splitlines()[-1])}
            with log.open("a") as f:
                f.write(json.dumps(report) + "\n")
            print(f"[gpu_check] serve, packed prefill {packed}: " + ", ".join(
                f"{r['clients']} clients {r['aggregate_tok_s']} tok/s (x{r['vs_one_client']}, TTFT "
                f"{r['server_ttft_ms_mean']} ms)" for r in report["rounds"]), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
