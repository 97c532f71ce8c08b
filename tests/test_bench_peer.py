"""scripts/bench_peer.py on the CPU: talis timed alone (ExLlamaV2 needs CUDA: one line says so), its report's
load phases, prefill lengths and greedy reply as the engine gives them in this process."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_peer.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_bench_peer_times_talis_alone_on_the_cpu():
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.generation import GenerationConfig, Generator

    done = subprocess.run([sys.executable, str(SCRIPT), "default", "--prompts", "8,20", "--gen", "6",
                           "--repeats", "1"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "exllamav2 needs a CUDA GPU: timing talis only"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ctx"] == 128 + 6 + 1 and [e["engine"] for e in report["engines"]] == ["talis"]
    talis = report["engines"][0]
    assert set(talis["prefill"]) == {"8", "20"} and talis["device"] == "cpu" and talis["graphs_captured"] == 0
    assert list(talis["load_phases"]) == ["imports", "config and plan", "tokenizer", "weights read",
                                          "backend prepare", "KV cache"]
    assert sum(talis["load_phases"].values()) == pytest.approx(talis["load_s"], rel=1e-6)
    assert "prefill 20: first / median" in done.stdout and "decode tok/s" in done.stdout

    engine = Engine.load(LoadSettings(device_map="cpu", max_seq_len=report["ctx"]))
    prompt = load_script().prompt_ids(engine.args.vocab_size, 128)
    generator = Generator(engine.model, engine.tokenizer, [], engine.max_seq_len)
    events = generator.stream(prompt, GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert talis["decode_prompt"] == 128 and talis["decode_ids"] == [t for e in events for t in e.token_ids]


def test_bench_peer_needs_one_model():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "name a model folder (or `default`) or --shape, not both" in done.stderr


def test_a_peer_that_is_not_installed_is_reported_in_one_line():
    if importlib.util.find_spec("exllamav2") is not None:
        pytest.skip("exllamav2 is installed here")
    module = load_script()
    opts = module.parse_args(["default", "--prompts", "8", "--gen", "4"])
    report = module.run_worker("exllamav2", opts, timeout_s=120)
    assert report == {"engine": "exllamav2", "error": "cannot import exllamav2 (No module named 'exllamav2'); "
                                                      "see this script's docstring"}
    table = module.format_table([report])
    assert table.splitlines()[-1] == "exllamav2: cannot import exllamav2 (No module named 'exllamav2'); " \
                                     "see this script's docstring"


def test_the_default_prompt_lengths_keep_within_the_models_context(capsys):
    """`bench_peer.py default` as written: the embedded model holds 512 tokens, so the default lengths
    (128, 512, 2048) keep those it holds and the cache is its context; lengths asked for beyond it are one line."""
    module = load_script()
    opts = module.parse_args(["default"])
    assert opts.prompts == [128, 512] and opts.ctx == 512
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["default", "--prompts", "8,2048"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: prompt lengths 2048 exceed the model's context (512 tokens); pass shorter --prompts")
    failed = {"engine": "talis", "error": "exit 1: talis_cli.errors.UsageError: a reason"}
    assert module.format_table([failed]) == "talis: exit 1: talis_cli.errors.UsageError: a reason"


def test_a_random_folder_made_for_shape_is_removed_at_the_end(tmp_path, monkeypatch):
    """--shape without --out writes a temporary folder (gigabytes for a 7B or 70B shape): it is gone after the run,
    whatever the engines did; with --out it stays."""
    module = load_script()
    made = []

    def random_folder(opts):
        folder = (opts.out or tmp_path / f"random-{len(made)}")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 64)
        made.append(folder)
        return str(folder)

    monkeypatch.setattr(module, "random_folder", random_folder)
    monkeypatch.setattr(module, "run_worker", lambda name, opts, timeout_s: {"engine": name, "error": "exit 1: x"})
    assert module.main(["--shape", "7B", "--peer", "none"]) == 1
    assert module.main(["--shape", "7B", "--peer", "none", "--out", str(tmp_path / "kept")]) == 1
    assert not made[0].exists() and (made[1] / "model.safetensors").exists()
