"""Launch-configuration tuning for the Triton kernels, remembered on disk.

A `Tuner` holds the candidate configurations of one kernel (generated as a product of options, then pruned per
shape). The first call for a shape times every surviving candidate and keeps the fastest; the choice is written to
`$TALIS_CACHE_DIR` (default ~/.cache/talis)/autotune.json, keyed by GPU name and Triton version, so a later session
starts with its choices made and its first reply is not stalled by tuning. Under TRITON_INTERPRET=1 (CPU tests)
nothing is timed: the tuner returns its single interpreter configuration.

Candidates are timed as they run in the decode step: inside a CUDA graph (a Python launch costs more than a small
GEMV, so timing eager launches ranks configurations by noise) and with L2 emptied before each launch (a decode step
streams gigabytes of weights through a 50 MB L2, so no layer finds its weights there).
"""
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import triton


def generated_configs(**options: list) -> list[dict]:
    """Every combination of the given options, e.g. generated_configs(BLOCK_N=[64, 128], num_warps=[4, 8])."""
    names = list(options)
    return [dict(zip(names, values)) for values in itertools.product(*options.values())]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cache_path() -> Path:
    return Path(os.environ.get("TALIS_CACHE_DIR", Path.home() / ".cache" / "talis")) / "autotune.json"


class _L2Flush:
    """A buffer twice the L2 size; writing it evicts everything else from L2."""

    _buffers: dict = {}

    @classmethod
    def get(cls, device: torch.device) -> torch.Tensor:
        if device not in cls._buffers:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            cls._buffers[device] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
        return cls._buffers[device]


def graph_time_us(fn: Callable[[], None], cold_l2: bool = True, launches: int = 20, replays: int = 5) -> float:
    """GPU time of one `fn()` in microseconds: `launches` calls captured in one CUDA graph, median of `replays`.

    With cold_l2 each call follows a write of twice the L2 size, and the time of a graph of those writes alone is
    subtracted. `fn` must have run once already (compiled, buffers allocated) and must not synchronize.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _L2Flush.get(device) if cold_l2 else None

    def capture(with_fn: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                if flush is not None:
                    flush.fill_(0)
                if with_fn:
                    fn()
        return graph

    def median_ms(graph: torch.cuda.CUDAGraph) -> float:
        graph.replay()  # warm-up
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    total = median_ms(capture(True))
    baseline = median_ms(capture(False)) if flush is not None else 0.0
    return max(total - baseline, 0.0) * 1e3 / launches


class Tuner:
    """Picks and remembers the fastest configuration of one kernel per shape key."""

    def __init__(self, name: str, configs: list[dict], prune: Callable[[dict, tuple], bool],
                 interpreter_config: dict):
        self.name = name
        self.configs = configs
        self.prune = prune
        self.interpreter_config = interpreter_config
        self._chosen: dict[str, dict] | None = None  # "key" -> config, loaded from disk on first use

    def pick(self, key: tuple, launch: Callable[[dict], None]) -> dict:
        """The configuration for `key`; times the candidates with `launch(config)` the first time a key is seen."""
        if interpreting():
            return self.interpreter_config
        if self._chosen is None:
            self._chosen = _load_section(self._section())
        text = repr(key)
        config = self._chosen.get(text)
        if config is None:
            config = self._tune(key, launch)
            self._chosen[text] = config
            _store(self._section(), text, config)
        return config

    def _section(self) -> str:
        return f"{self.name}|{torch.cuda.get_device_name()}|triton {triton.__version__}"

    def _tune(self, key: tuple, launch: Callable[[dict], None]) -> dict:
        candidates = [c for c in self.configs if self.prune(c, key)] or self.configs[:1]  # tiny shapes: any will do
        if len(candidates) == 1:
            return candidates[0]
        timings = []
        for config in candidates:
            try:
                launch(config)  # compile (and any nested tuning) before timing
            except triton.runtime.errors.OutOfResources:
                timings.append(float("inf"))  # e.g. too much shared memory for this GPU
                continue
            timings.append(graph_time_us(lambda: launch(config)))
        return candidates[min(range(len(candidates)), key=timings.__getitem__)]


def _load_section(section: str) -> dict:
    try:
        return json.loads(cache_path().read_text()).get(section, {})
    except (OSError, ValueError):
        return {}


def _store(section: str, key: str, config: dict) -> None:
    """Merge one choice into the cache file; written atomically so concurrent sessions never see half a file."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            everything = json.loads(path.read_text())
        except (OSError, ValueError):
            everything = {}
        everything.setdefault(section, {})[key] = config
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(everything, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only home only costs re-tuning next session
