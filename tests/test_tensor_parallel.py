"""Tensor parallelism on CPUs: 2 ranks over gloo on 127.0.0.1 against one process, the shards of GPTQ tensors
against plain slices of the dequantized weight, the checks, and every rank ending together on a failure."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from quant_kernels import gptq_format
from talis_cli.errors import TalisError, UsageError
from talis_cli.tensor_parallel import requested_size
from talis_cli.tensor_parallel.shard import Shard
from tests.tiny_models import hf_model, quantize_tensors, save_gptq

WORKER = Path(__file__).parent / "tp_worker.py"
PROMPT = "And God said"


def run(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def worker(*args, timeout: float = 120) -> dict:
    result = run([WORKER, *args], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- shards of GPTQ tensors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 32, True), (3, 32, True), (4, -1, False)])
def test_gptq_shards_dequantize_to_slices_of_the_weight(bits, group_size, act_order):
    model = hf_model(seed=3, num_key_value_heads=2)
    sd, _ = quantize_tensors(model, bits, group_size, act_order=act_order)
    for linear, dim in (("self_attn.k_proj", 1), ("mlp.up_proj", 1), ("self_attn.o_proj", 0), ("mlp.down_proj", 0)):
        prefix = f"model.layers.1.{linear}"
        full = {k: sd[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        weight = gptq_format.dequantize(*full.values(), bits, 1)  # [in, out]
        parts = []
        for rank in range(2):
            shard = Shard(rank, 2, bits=bits, group_size=group_size, act_order=act_order)
            t = {k: shard.tensor(f"{prefix}.{k}", v) for k, v in full.items()}
            parts.append(gptq_format.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1))
        assert torch.equal(torch.cat(parts, dim=dim), weight), linear


def test_act_order_row_shard_keeps_its_own_g_idx_and_every_group():
    model = hf_model(seed=4)
    sd, _ = quantize_tensors(model, 4, 32, act_order=True)
    name = "model.layers.0.mlp.down_proj"
    g_idx = sd[f"{name}.g_idx"]
    assert not torch.equal(g_idx, gptq_format.default_g_idx(g_idx.numel(), 32))  # really act-order
    shard = Shard(1, 2, bits=4, group_size=32, act_order=True)
    assert torch.equal(shard.tensor(f"{name}.g_idx", g_idx), g_idx[128:])
    assert torch.equal(shard.tensor(f"{name}.scales", sd[f"{name}.scales"]), sd[f"{name}.scales"])


def test_a_split_that_cuts_a_quantization_group_is_one_line():
    from talis_cli.config import ModelArgs

    args = ModelArgs(dim=128, n_heads=4, n_kv_heads=4, head_dim=32, intermediate_size=192)
    with pytest.raises(TalisError) as err:
        Shard(0, 2, bits=4, group_size=64).local_args(args)
    assert str(err.value) == ("--tensor-parallel 2 would cut a quantization group: a row-parallel layer of in_features "
                              "192 splits into blocks of 96 rows, not a multiple of the group size 64; choose an N "
                              "with in_features divisible by N x 64")
    with pytest.raises(TalisError, match=r"^--tensor-parallel 3: the model has 4 attention heads and 4 KV heads; "
                                         r"N must divide both \(try 2, 4\)$"):
        Shard(0, 3).local_args(args)
    local = Shard(1, 2, bits=4, group_size=32).local_args(args)
    assert (local.n_heads, local.n_kv_heads, local.intermediate_size, local.head_dim) == (2, 2, 96, 32)


def test_requested_size_from_the_flag_or_the_device_map():
    assert requested_size(None, {}) == 1
    assert requested_size(None, {"tensor_parallel": 2}) == 2
    assert requested_size(4, {"tensor_parallel": 2}) == 4  # the flag wins
    for bad in (0, "2", True):
        with pytest.raises(UsageError, match="tensor_parallel"):
            requested_size(None, {"tensor_parallel": bad}, "device map tp.json")
    with pytest.raises(UsageError, match=r"--tensor-parallel 0 must be a positive integer"):
        requested_size(0)


def test_layer_placement_and_tensor_parallel_do_not_mix():
    from talis_cli.engine import LoadSettings
    from talis_cli.tensor_parallel import check_settings

    with pytest.raises(UsageError, match=r"^the device map places layers \(layers\); with tensor parallelism"):
        check_settings(LoadSettings(), {"tensor_parallel": 2, "layers": {"0-7": 0}}, "the device map")
    with pytest.raises(UsageError, match=r"^--max-memory places the layers of a split model"):
        check_settings(LoadSettings(max_memory="0=20GiB"), {"tensor_parallel": 2}, "the device map")
    check_settings(LoadSettings(), {"tensor_parallel": 2, "device": "cpu"}, "the device map")


def test_chat_refuses_tensor_parallel_in_one_line():
    from talis_cli.cli import _refuse_tensor_parallel
    from talis_cli.settings import RunSettings

    with pytest.raises(UsageError, match=r"^talis chat does not run with tensor parallelism yet; use talis generate"):
        _refuse_tensor_parallel(RunSettings(tensor_parallel=2), "talis chat")
    _refuse_tensor_parallel(RunSettings(), "talis chat")  # no tensor parallelism: nothing to refuse


# --- 2 ranks against one process ---------------------------------------------------------------------------------
def assert_same_as_one_process(report: dict) -> None:
    # the ranks sum two partial matmuls where one process sums once: fp32 reduction-order noise only
    assert report["max_abs_diff"] <= 1e-5 * max(1.0, report["max_abs"]), report
    assert report["tp_single"] == report["one_single"]
    assert report["tp_batch"] == report["one_batch"]  # a left-padded batch of two
    assert [2 * h for h in report["heads"]] == report["full_heads"]  # each rank held half


def test_embedded_model_over_two_ranks_matches_one_process():
    assert_same_as_one_process(worker("--tokens", "16", "--cpu"))


def test_act_order_gqa_gptq_model_over_two_ranks_matches_one_process(tmp_path):
    save_gptq(hf_model(seed=5, num_attention_heads=4, num_key_value_heads=2), tmp_path, bits=4, group_size=64,
              act_order=True)
    report = worker("--model", tmp_path, "--tokens", "12", "--cpu")
    assert report["full_heads"] == [4, 2, 256]
    assert_same_as_one_process(report)


# --- the command ---------------------------------------------------------------------------------------------------
def test_generate_with_tensor_parallel_prints_the_same_text():
    """Ranks started by talis, and ranks started by torchrun (each process joins as RANK of WORLD_SIZE)."""
    from talis_cli.tensor_parallel.launch import free_port

    args = ["-m", "talis_cli", "generate", "-p", PROMPT, "-n", "24", "--temperature", "0", "--device-map", "cpu"]
    plain, split = run(args), run([*args, "--tensor-parallel", "2"])
    assert plain.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == plain.stdout and len(plain.stdout) > len(PROMPT)
    assert split.stderr == ""
    torchrun = run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(), *args,
                    "--tensor-parallel", "2"], env={"OMP_NUM_THREADS": "1"})
    assert torchrun.returncode == 0, torchrun.stderr
    assert torchrun.stdout == plain.stdout


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_failure_on_rank_1_ends_both_ranks_with_one_message(tmp_path):
    """The device map asks for 2 ranks; rank 1 fails at its first decode step while rank 0 waits in a collective."""
    device_map = tmp_path / "tp.json"
    device_map.write_text(json.dumps({"tensor_parallel": 2, "device": "cpu"}))
    marker = f"talis-tp-test-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = run(["-m", "talis_cli", "generate", "-p", PROMPT, "-n", "8", "--device-map", device_map],
                 env={"TALIS_TP_FAIL": "1", "TALIS_TP_TEST_MARK": marker})
    assert result.returncode == 1
    assert result.stderr == "error: rank 1: injected failure (TALIS_TP_FAIL=1)\n"
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == []


def test_a_model_that_does_not_split_fails_in_one_line_before_any_rank_starts(tmp_path):
    """down_proj's 192 input rows split into blocks of 96, which cut its groups of 64."""
    save_gptq(hf_model(seed=6, intermediate_size=192), tmp_path, bits=4, group_size=64)
    result = run(["-m", "talis_cli", "generate", "-m", tmp_path, "-p", PROMPT, "-n", "4", "--tensor-parallel", "2",
                  "--device-map", "cpu"])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "would cut a quantization group" in result.stderr
    assert "in_features 192" in result.stderr and "group size 64" in result.stderr


# --- two GPUs ----------------------------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.gpu
@two_gpus
def test_tp2_on_two_gpus_matches_one_gpu_on_a_13b_shape(tmp_path):
    """A random 13B-shape GPTQ folder (4 of its 40 layers): 64 greedy tokens through the per-rank CUDA graphs with
    the all-reduces inside, against one GPU. fp16 sums in another order may flip a near-tie: then the first
    difference must be one (the one-GPU top-2 gap within the two engines' logit difference there)."""
    script = Path(__file__).parents[1] / "scripts" / "random_checkpoint.py"
    made = run([script, "--shape", "13B", "--layers", "4", "--out", tmp_path, "--device", "cuda"])
    assert made.returncode == 0, made.stderr
    report = worker("--model", tmp_path, "--tokens", "64", timeout=170)  # kernel tuning on a fresh machine
    assert report["heads"] == [20, 20, 6912] and report["full_heads"] == [40, 40, 13824]
    assert_same_as_one_gpu(report)


@pytest.mark.gpu
@two_gpus
def test_tp2_on_two_gpus_matches_one_gpu_on_the_embedded_model():
    """Act-order GPTQ: the row-parallel layers' shards keep their own g_idx (the Triton kernels need equal groups,
    so those layers compute with the torch backend); the column-parallel ones run the Triton kernels."""
    report = worker("--tokens", "64", timeout=170)
    assert report["heads"] == [4, 2, 384]
    assert_same_as_one_gpu(report)


def assert_same_as_one_gpu(report: dict) -> None:
    assert report["max_abs_diff"] <= 0.02 * max(1.0, report["max_abs"]), report  # fp16 noise
    diff = report["first_diff"]
    if diff is not None:  # a near-tie flipped by the order of fp16 sums, and nothing else
        assert diff["top2_gap"] <= 2 * diff["max_abs_diff"], report
    else:
        assert report["tp_single"] == report["one_single"]
    assert len(report["tp_single"][0]) == 64 or report["tp_single"] == report["one_single"]  # an EOS may come first


def test_ctrl_c_ends_every_rank_with_exit_130():
    """SIGINT to the whole process group, as a terminal sends it: rank 0 decides, the other rank goes with it."""
    import signal

    from tests.test_cli import default_sigint

    marker = f"talis-tp-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-m", "talis_cli", "generate", "-p", PROMPT, "-n", "4000",
                             "--temperature", "0", "--max-seq-len", "512", "--device-map", "cpu",
                             "--tensor-parallel", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TALIS_TP_TEST_MARK": marker}, preexec_fn=default_sigint)
    try:
        assert proc.stdout.read(1)  # generating: both ranks are up and stepping together
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert b"Traceback" not in proc.stderr.read()
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == []


def test_weights_that_do_not_match_their_config_fail_every_rank_with_one_message(tmp_path):
    """Each rank reads the same mismatched folder and fails while loading; the user sees one line."""
    save_gptq(hf_model(seed=8), tmp_path, bits=4, group_size=64)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 384}))  # splits, but is wrong
    result = run(["-m", "talis_cli", "generate", "-m", tmp_path, "-p", PROMPT, "-n", "4", "--tensor-parallel", "2",
                  "--device-map", "cpu"])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "but config.json implies" in lines[0], result.stderr
