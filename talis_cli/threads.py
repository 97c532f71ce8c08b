"""How many CPU threads torch may use (`--threads N`, llama.cpp's -t).

torch's default is one thread per core of the machine. On a shared machine that oversubscribes the cores: the
threads of one matrix product wait for each other while other processes hold the cores (decode of the embedded
model fell from ~250 to under 2 tokens/s at load 9 on 2 cores; one thread gave 25). The default here is:

1. OMP_NUM_THREADS when it is set (the user or the job scheduler decided);
2. else the cores this process may run on (its CPU affinity, and a cgroup CPU quota when there is one), minus the
   machine's 1-minute load average (other processes' busy cores), rounded to the nearest integer, at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UsageError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


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


def default_threads(cores: int | None = None, load: float | None = None, env: dict | None = None) -> int:
    """The default thread count by the rule in this module's docstring (arguments override what is measured)."""
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
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (None: `default_threads()`); returns the number set.

    Raises UsageError for a count below 1.
    """
    import torch

    if threads is None:
        threads = default_threads()
    elif threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    return threads
