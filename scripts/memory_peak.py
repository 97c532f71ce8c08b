"""What was allocated at the peak of a `talis bench` row: its allocations replayed from a memory-history snapshot.

On the GPU machine, record one row's allocations (talis_cli.bench._measure writes the snapshot when
TALIS_MEMORY_HISTORY names a file; torch's recorder with Python stacks):

    TALIS_MEMORY_HISTORY=$OUT/kv65b.pickle PYTHONPATH=. python3 scripts/gpu_check.py --no-tests kv65b
    PYTHONPATH=. python3 scripts/memory_peak.py $OUT/kv65b.pickle [--top 25]

The device trace (alloc and free_requested events: what `torch.cuda.max_memory_allocated` counts) is replayed in
order; at its highest point the live allocations are grouped by the innermost frame in talis' own code
(talis_cli/, quant_kernels/, scripts/) and printed largest first, in bytes, GB (10^9) and GiB. Runs anywhere
(no GPU needed to read a snapshot).
"""
from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict

OUR_CODE = ("talis_cli/", "quant_kernels/", "scripts/")


def where(frames: list[dict]) -> str:
    """'file:line function' of the innermost frame in our code (torch's own frames skipped), else the innermost."""
    for frame in frames:
        name = frame.get("filename", "")
        if any(part in name for part in OUR_CODE):
            short = name[max(name.rfind(part) for part in OUR_CODE if part in name):]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return f"{frames[0].get('filename')}:{frames[0].get('line')} {frames[0].get('name')}" if frames else "(no stack)"


def peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """(peak bytes above the start of the trace, the allocations live at that peak by address) from one device's
    trace. Frees of blocks allocated before the trace began are skipped (the bench starts it on a clean GPU)."""
    live: dict[int, dict] = {}
    now = top = 0
    at_top: dict[int, dict] = {}
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > top:
                top, at_top = now, dict(live)
        elif action == "free_requested" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    return top, at_top


def grouped(allocations: dict[int, dict]) -> list[tuple[str, int, int]]:
    """(where, bytes, count) per allocation site, largest first."""
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in allocations.values():
        site = sites[where(event.get("frames") or [])]
        site[0] += event["size"]
        site[1] += 1
    return sorted(((w, b, c) for w, (b, c) in sites.items()), key=lambda row: -row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to print")
    opts = parser.parse_args(argv)
    try:
        with open(opts.snapshot, "rb") as f:
            snapshot = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        print(f"memory_peak.py: cannot read {opts.snapshot}: {e}", file=sys.stderr)
        return 1
    for device, trace in enumerate(snapshot.get("device_traces", [])):
        if not trace:
            continue
        top, live = peak(trace)
        print(f"cuda:{device}: peak {top:,} bytes = {top / 1e9:.3f} GB = {top / 2**30:.3f} GiB above the trace's start, "
              f"{len(live)} allocations live ({len(trace)} events)")
        for site, nbytes, count in grouped(live)[:opts.top]:
            print(f"  {nbytes:>15,} {nbytes / 1e9:>8.3f} GB {count:>6}x  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
