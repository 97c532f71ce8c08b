"""Launch-configuration tuning for the Triton kernels, remembered on disk.

A `Tuner` holds the candidate configurations of one kernel (generated as a product of options, then pruned per
shape). The first call for a shape times every surviving candidate and keeps the fastest; the choice is written to
`$TALIS_CACHE_DIR` (default ~/.cache/talis)/autotune.json, keyed by GPU name and Triton version, so a later session
starts with its choices made and its first reply is not stalled by tuning. Under TRITON_INTERPRET=1 (CPU tests)
nothing is timed: the tuner returns its single interpreter configuration.

A table of choices ships with the package (`tuned_configs.json` beside this module, the cache file's layout,
written by `scripts/tune_kernels.py` on the GPUs we can measure): a shape it holds for this GPU is
never timed, so a fresh machine's first load does not tune. The order: this machine's cache (its own timings win),
the table's section for this GPU and Triton version, then the table's choices for this GPU under other Triton
versions (a choice launches under any version; only the ranking may move), else tuning. TALIS_TUNED_TABLE=0
ignores the table (a tuning run that writes it).

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


TABLE_PATH = Path(__file__).with_name("tuned_configs.json")  # shipped choices: {section: {repr(key): config}}


def cache_path() -> Path:
    return Path(os.environ.get("TALIS_CACHE_DIR", Path.home() / ".cache" / "talis")) / "autotune.json"


def section_name(kernel: str, device_name: str, triton_version: str) -> str:
    """The key of one kernel's choices on one GPU model under one Triton version (cache file and table)."""
    return f"{kernel}|{device_name}|triton {triton_version}"


def shipped_choices(kernel: str, device_name: str, triton_version: str, path: Path | None = None) -> dict:
    """The table's choices {repr(key): config} of `kernel` on `device_name`: those of other Triton versions first
    (in section-name order, a later one overriding), then those of this version over them. {} without a table or with
    TALIS_TUNED_TABLE=0."""
    if os.environ.get("TALIS_TUNED_TABLE", "1") == "0":
        return {}
    table = _read_json(path or TABLE_PATH)
    exact = section_name(kernel, device_name, triton_version)
    prefix = section_name(kernel, device_name, "")
    choices: dict = {}
    for name in sorted(n for n in table if n.startswith(prefix) and n != exact):
        choices.update(table[name])
    choices.update(table.get(exact, {}))
    return choices


def write_table(sections: dict, path: Path | None = None) -> Path:
    """Merge `sections` ({section: {repr(key): config}}, e.g. a tuning run's cache file) into the shipped table
    (a key tuned again replaces the old choice); returns the table's path. OSError when it cannot be written."""
    path = path or TABLE_PATH
    table = _read_json(path)
    for name, choices in sections.items():
        table.setdefault(name, {}).update(choices)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


class _L2Flush:
    """A buffer twice the L2 size; writing it evicts everything else from L2. Held only while a shape is tuned
    (`Tuner._tune` releases it): 105 MB on an H100 or H200 that would otherwise stay allocated beside the model."""

    _buffers: dict = {}

    @classmethod
    def get(cls, device: torch.device) -> torch.Tensor:
        if device not in cls._buffers:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            with torch.inference_mode(False):  # a normal tensor: written by tunings inside and outside that mode
                cls._buffers[device] = torch.empty(2 * l2, dtype=torch.uint8, device=device)
        return cls._buffers[device]

    @classmethod
    def release(cls) -> None:
        """Drop the buffers (the graphs that wrote them are gone by then); the next tuning allocates them again."""
        cls._buffers.clear()


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
    baseline = 0.0
    if flush is not None:  # the flushes alone cost the same for every fn: timed once per device and launch count
        key = (device, launches)
        if key not in _FLUSH_MS:
            _FLUSH_MS[key] = median_ms(capture(False))
        baseline = _FLUSH_MS[key]
    return max(total - baseline, 0.0) * 1e3 / launches


_FLUSH_MS: dict[tuple, float] = {}  # (device, launches) -> ms of a graph of `launches` L2 flushes alone


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
        if self._chosen is None:  # this machine's own timings over the shipped table
            self._chosen = {**shipped_choices(self.name, torch.cuda.get_device_name(), triton.__version__),
                            **_load_section(self._section())}
        text = repr(key)
        config = self._chosen.get(text)
        if config is None:
            config = self._tune(key, launch)
            self._chosen[text] = config
            _store(self._section(), text, config)
        return config

    def _section(self) -> str:
        return section_name(self.name, torch.cuda.get_device_name(), triton.__version__)

    def _tune(self, key: tuple, launch: Callable[[dict], None]) -> dict:
        candidates = [c for c in self.configs if self.prune(c, key)] or self.configs[:1]  # tiny shapes: any will do
        if len(candidates) == 1:
            return candidates[0]
        timings = []
        try:
            for config in candidates:
                try:
                    launch(config)  # compile (and any nested tuning) before timing
                except triton.runtime.errors.OutOfResources:
                    timings.append(float("inf"))  # e.g. too much shared memory for this GPU
                    continue
                timings.append(graph_time_us(lambda: launch(config)))
        finally:
            _L2Flush.release()  # tuning is rare; the model and its KV cache need the memory the rest of the time
        return candidates[min(range(len(candidates)), key=timings.__getitem__)]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_section(section: str) -> dict:
    return _read_json(cache_path()).get(section, {})


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
