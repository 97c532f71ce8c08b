"""The shipped table of tuned launch configurations: a shape it holds for this GPU is never timed; this machine's
own cache wins over it; TALIS_TUNED_TABLE=0 ignores it; scripts/tune_kernels.py merges a tuning run into it."""
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from quant_kernels import autotune_cache
from quant_kernels.autotune_cache import Tuner, section_name, shipped_choices, write_table

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H200"
KEY = (4096, 4096, 4, 7, False)
CONFIGS = [dict(BLOCK_N=128, SPLIT_K=s) for s in (1, 2, 4)]


class Timed(Exception):
    """Raised by the launch of a test tuner: the tuner went on to time candidates."""


def launch(config: dict) -> None:
    raise Timed(config)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A table file and an empty machine cache, the tuner outside the interpreter on a pretend H200."""
    path = tmp_path / "tuned_configs.json"
    monkeypatch.setattr(autotune_cache, "TABLE_PATH", path)
    monkeypatch.setenv("TALIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TALIS_TUNED_TABLE", raising=False)
    monkeypatch.setattr(autotune_cache, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)
    return path


def tuner() -> Tuner:
    return Tuner("gemv2", CONFIGS, prune=lambda c, key: True, interpreter_config=CONFIGS[0])


def test_a_shape_in_the_table_is_not_timed(table):
    write_table({section_name("gemv2", GPU, triton.__version__): {repr(KEY): CONFIGS[2]}})
    assert tuner().pick(KEY, launch) == CONFIGS[2]
    with pytest.raises(Timed):  # a shape it lacks is tuned
        tuner().pick((4096, 11008, 4, 7, False), launch)


def test_the_machine_cache_wins_and_other_triton_versions_serve(table):
    write_table({section_name("gemv2", GPU, "0.1"): {repr(KEY): CONFIGS[1], repr((1, 2)): CONFIGS[1]},
                 section_name("gemv2", "NVIDIA H100 80GB HBM3", triton.__version__): {repr((3, 4)): CONFIGS[2]}})
    assert tuner().pick(KEY, launch) == CONFIGS[1]  # another Triton version's choice, for want of this one's
    with pytest.raises(Timed):  # another GPU's choice is not taken
        tuner().pick((3, 4), launch)
    autotune_cache._store(section_name("gemv2", GPU, triton.__version__), repr(KEY), CONFIGS[0])
    assert tuner().pick(KEY, launch) == CONFIGS[0]  # this machine's own timing
    assert tuner().pick((1, 2), launch) == CONFIGS[1]


def test_tuned_table_off(table, monkeypatch):
    write_table({section_name("gemv2", GPU, triton.__version__): {repr(KEY): CONFIGS[2]}})
    monkeypatch.setenv("TALIS_TUNED_TABLE", "0")
    assert shipped_choices("gemv2", GPU, triton.__version__) == {}
    with pytest.raises(Timed):
        tuner().pick(KEY, launch)


def test_write_table_merges_sections(tmp_path):
    path = tmp_path / "table.json"
    a, b = section_name("gemv2", GPU, "3.6.0"), section_name("gemv2", GPU, "3.7.0")
    write_table({a: {"k1": {"x": 1}, "k2": {"x": 2}}}, path)
    write_table({a: {"k2": {"x": 3}}, b: {"k1": {"x": 4}}}, path)
    assert json.loads(path.read_text()) == {a: {"k1": {"x": 1}, "k2": {"x": 3}}, b: {"k1": {"x": 4}}}
    assert shipped_choices("gemv2", GPU, "3.7.0", path) == {"k1": {"x": 4}, "k2": {"x": 3}}
    assert shipped_choices("gemv2", GPU, "3.5.0", path) == {"k1": {"x": 4}, "k2": {"x": 3}}  # newest wins
    assert shipped_choices("gemm", GPU, "3.7.0", path) == {}


def test_the_shipped_table_is_valid_json_of_sections():
    table = json.loads(autotune_cache.TABLE_PATH.read_text())
    for section, choices in table.items():
        kernel, device, version = section.split("|")
        assert version.startswith("triton ") and all(isinstance(c, dict) for c in choices.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_tune_kernels_script_needs_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_kernels.py"), "--shapes", "7B"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "tune_kernels.py needs a CUDA GPU (the choices are timings of this GPU); run it on the GPU machine"]


def test_tune_kernels_merge_writes_a_runs_choices_into_the_table(tmp_path, monkeypatch):
    """--merge (no GPU): the file a GPU run wrote with --json lands in the shipped table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_kernels", ROOT / "scripts" / "tune_kernels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = tmp_path / "tuned_configs.json"
    monkeypatch.setattr(autotune_cache, "TABLE_PATH", table)
    run = tmp_path / "tuned.json"
    sections = {section_name("gemv2", GPU, "3.6.0"): {repr(KEY): CONFIGS[1]}}
    run.write_text(json.dumps(sections))
    assert script.main(["--merge", str(run)]) == 0
    assert json.loads(table.read_text()) == sections
    assert script.main(["--merge", str(tmp_path / "missing.json")]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_load_covered_by_the_table_times_nothing(tmp_path, monkeypatch):
    """scripts/tune_kernels.py --model default (its own process), merged into a table: with an empty machine cache,
    loading the embedded model and generating from short prompts pick every configuration from the table."""
    from quant_kernels.triton_gemv import GEMV_TUNER
    from quant_kernels.triton_skinny import SKINNY_TUNER
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.generation import GenerationConfig

    run = tmp_path / "run.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_kernels.py"), "--model", "default",
                           "--json", str(run)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    monkeypatch.setattr(autotune_cache, "TABLE_PATH", tmp_path / "tuned_configs.json")
    write_table(json.loads(run.read_text()))
    monkeypatch.setenv("TALIS_CACHE_DIR", str(tmp_path / "empty"))

    def no_timing(key, launch):
        raise AssertionError(f"tuned at load: {key}")

    for tuner in (GEMV_TUNER, SKINNY_TUNER):  # earlier tests of this process loaded the shipped table into both
        monkeypatch.setattr(tuner, "_chosen", None)  # forget this process's choices
        monkeypatch.setattr(tuner, "_tune", no_timing)
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    # prompts of a few and of 17-32 tokens: the GEMV, and the 8-32-row kernel where there is one
    for text in ("In the beginning", "In the beginning God created the heaven and the earth. And the earth was "
                                     "without form, and void; and darkness"):
        assert 4 <= len(engine.encode(text)) <= 32
        assert list(engine.generator.stream(engine.encode(text), cfg))
    tuned = tmp_path / "empty" / "autotune.json"
    assert not tuned.exists(), f"tuned after load: {tuned.read_text()}"


def test_tuning_releases_its_l2_flush_buffer(table, monkeypatch):
    """The L2-flush buffer (twice the L2: 105 MB on an H200) is held while a shape is tuned, not beside the model
    afterwards; the fastest candidate is still the one kept."""
    held, chosen = [], []

    def fake_time(fn):  # what graph_time_us does to the buffer, with a made-up time per candidate
        fn()
        autotune_cache._L2Flush._buffers["gpu"] = torch.empty(8, dtype=torch.uint8)
        held.append(len(autotune_cache._L2Flush._buffers))
        return {1: 3.0, 2: 1.0, 4: 2.0}[chosen[-1]["SPLIT_K"]]

    monkeypatch.setattr(autotune_cache, "graph_time_us", fake_time)
    launcher = chosen.append
    assert tuner().pick(KEY, launcher) == CONFIGS[1]
    assert held == [1, 1, 1] and autotune_cache._L2Flush._buffers == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_a_gemv_on_the_gpu_leaves_no_memory_allocated():
    """A real tuning run on the GPU: memory allocated after it is what it was before (no flush buffer kept)."""
    from quant_kernels.triton_backend import TritonBackend
    from quant_kernels.triton_gemv import GEMV_TUNER, quant_gemv
    from talis_cli.bench import random_quant_linear

    layer = random_quant_linear(4096, 4096, 4, 128, False, "cuda")
    weight = TritonBackend().prepare(layer)
    x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")
    out = quant_gemv(x, *weight.args(), config=GEMV_TUNER.configs[0])  # compiles; the workspace is reserved
    gc.collect()  # earlier tests' garbage, freed now rather than during the tuning
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    GEMV_TUNER._tune((4096, 4096, 4, 7, False), lambda cfg: quant_gemv(x, *weight.args(), out=out, config=cfg))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
