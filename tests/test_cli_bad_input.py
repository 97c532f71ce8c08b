"""Bad checkpoints and presets through the real command: one `error:` line, exit code 1 or 2, no traceback."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import one_line_error, run_talis
from tests.tiny_models import hf_model, save_gptq


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_input_model")
    save_gptq(hf_model(seed=11), folder, bits=4, group_size=64)
    return folder


def broken_copy(gptq_dir, tmp_path, how: str):
    folder = tmp_path / "model"
    shutil.copytree(gptq_dir, folder)
    weights = folder / "model.safetensors"
    extra = []
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100_000])
    elif how == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    elif how == "shape":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["hidden_size"] = 256
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "bits":
        extra = ["--wbits", "8"]
    elif how == "pickle":
        torch.save(load_file(str(weights)), tmp_path / "model.pt")
        weights.unlink()
        extra = ["--checkpoint", tmp_path / "model.pt"]
    elif how == "preset-unknown-key":
        (tmp_path / "mine.json").write_text('{"temperature": 0.5, "temprature": 0.7}')
        extra = ["--preset", tmp_path / "mine.json"]
    elif how == "preset-broken":
        (tmp_path / "mine.json").write_text('{"temperature": 0.5,\n  "top_k": }')
        extra = ["--preset", tmp_path / "mine.json"]
    return folder, extra


@pytest.mark.parametrize("how, code, needle", [
    ("truncated", 1, "truncated"),
    ("corrupt", 1, "model.safetensors"),
    ("shape", 1, "don't belong together"),
    ("bits", 1, "--wbits 8 contradicts"),
    ("pickle", 1, "--allow-pickle"),
    ("preset-unknown-key", 2, "temprature"),
    ("preset-broken", 2, "mine.json"),
])
def test_bad_input_gives_one_line_and_a_nonzero_exit(gptq_dir, tmp_path, how, code, needle):
    folder, extra = broken_copy(gptq_dir, tmp_path, how)
    result = run_talis("generate", "-m", folder, "-p", "hello", "-n", "4", *extra)
    assert result.returncode == code
    assert needle in one_line_error(result)
    assert result.stdout == b""
