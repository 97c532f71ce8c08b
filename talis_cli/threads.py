"""How many CPU threads torch may use (`--threads N`, llama.cpp's -t).

torch's default is one thread per core of the machine. On a shared machine that oversubscribes the cores: the
threads of one matrix product wait for each other while other processes hold the cores (decode of the embedded
model fell from ~250 to under 2 tokens/s at load 9 on 2 cores; one thread gave 25). The default here is:

1. OMP_NUM_THREADS when it is set (the user or the job scheduler decided);
2. else the cores this process may run on (its CPU affinity, and a cgroup CPU quota when there is one), minus the
   machine's 1-minute load average (other processes' busy cores), minus the cores the caller reserves (`talis
   serve`: SERVER_RESERVED_CORES for its HTTP side and the clients on the same machine), rounded to the nearest
   integer, at least 1.

Why the server reserves one: with torch on both cores of an idle 2-core VM, one streaming client through `talis
serve` got 69 tok/s from the embedded model (14.4 ms a decode step, against 2.8 ms for the scheduler alone), most
likely as each matrix product waited for the thread that the event loop or the client had pushed off its core.
With one thread:
248 tok/s, and 1,101 aggregate for 8 clients against 564 (BENCHMARKS.md, 2026-12-01, eleventh session).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UsageError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
SERVER_RESERVED_CORES = 1  # what `talis serve` keeps free of torch's threads by default


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads(cores: int | None = None, load: float | None = None, env: dict | None = None,
                    reserve: int = 0) -> int:
    """The default thread count by the rule in this module's docstring, leaving `reserve` cores free (arguments
    override what is measured)."""
    env = os.environ if env is None else env
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given)
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, math.floor(cores - reserve - load + 0.5)))


def set_threads(threads: int | None = None, reserve: int = 0) -> int:
    """Set torch's intra-op threads to `threads` (None: `default_threads(reserve=reserve)`); returns the number set.

    Raises UsageError for a count below 1.
    """
    import torch

    if threads is None:
        threads = default_threads(reserve=reserve)
    elif threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    return threads
