"""How fast `talis` starts: `talis --help` and `talis presets` next to `python -c "import torch"`, and the time
from launching `talis generate` on the embedded model (CPU) to its first streamed byte of text.

Goals: --help under a third of the torch import (issue 3); first token within 1.5 s on an idle 2-core machine
(issue 14). The 1-minute load average before and after is printed: on a busy machine the times say little.
Usage: python scripts/bench_startup.py [--runs 5] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "In the beginning God created"


def talis_command() -> list:
    """The installed console script when there is one beside this Python, else `python -m talis_cli`."""
    script = Path(sys.executable).with_name("talis")
    return [str(script)] if script.exists() else [sys.executable, "-m", "talis_cli"]


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("NO_COLOR", None)
    return env


def wall_time(command: list) -> float:
    """Seconds from launch to exit (the command must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    return time.perf_counter() - started


def first_output_time(command: list) -> float:
    """Seconds from launch to the first byte on stdout; the process is then left to finish."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=environment())
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise RuntimeError(f"{' '.join(command)} failed")
    return elapsed


def median_of(measure, command: list, runs: int) -> float:
    measure(command)  # warm the file cache; not counted
    return statistics.median(measure(command) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()

    talis = talis_command()
    generate = talis + ["generate", "-p", PROMPT, "-n", "16", "--temperature", "0", "--device-map", "cpu"]
    load_before = os.getloadavg()[0]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), "
                   f"Python {platform.python_version()}, torch {version('torch')}",
        "talis": " ".join(Path(part).name if part == sys.executable else part for part in talis),
        "import_torch_s": median_of(wall_time, [sys.executable, "-c", "import torch"], options.runs),
        "help_s": median_of(wall_time, talis + ["--help"], options.runs),
        "presets_s": median_of(wall_time, talis + ["presets"], options.runs),
        "first_token_s": median_of(first_output_time, generate, options.runs),
    }
    results["help_over_import_torch"] = results["help_s"] / results["import_torch_s"]
    results["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if options.json:
        print(json.dumps(results))
        return
    print(f"machine: {results['machine']}; command: {results['talis']}; median of {options.runs} runs")
    print(f"python -c 'import torch'       {results['import_torch_s']:6.3f} s")
    print(f"talis --help                   {results['help_s']:6.3f} s  "
          f"({results['help_over_import_torch']:.2f} of the torch import; goal < 0.33)")
    print(f"talis presets                  {results['presets_s']:6.3f} s")
    print(f"talis generate: first token    {results['first_token_s']:6.3f} s  (embedded model on CPU; goal <= 1.5 s)")
    print(f"1-minute load average before / after: {results['load_average'][0]} / {results['load_average'][1]}")


if __name__ == "__main__":
    main()
