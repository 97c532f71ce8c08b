"""Loaders: the formats users have, and one clear error for each kind of bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from talis_cli.engine import Engine, LoadSettings
from talis_cli.errors import TalisError, UsageError
from talis_cli.placement import load_device_map, plan_devices
from quant_kernels.gptq import rtn_quantize
from tests.tiny_models import hf_model, save_fp16, save_gptq, with_weights

TOKENS = torch.randint(3, 4096, (1, 12), generator=torch.Generator().manual_seed(0))


def logits(folder, **kw):
    engine = Engine.load(LoadSettings(model_dir=folder, device_map="cpu", backend="torch", max_seq_len=64, **kw))
    engine.model.clear_cache()
    with torch.no_grad():
        return engine.model(TOKENS)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq")
    save_gptq(hf_model(seed=1), folder, bits=4, group_size=32, act_order=True)
    return folder


def error_of(folder, **kw) -> str:
    with pytest.raises(TalisError) as info:
        logits(folder, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_sharded_and_config_json_style_load_the_same_weights(tmp_path, gptq_dir):
    model = hf_model(seed=1)
    save_gptq(model, tmp_path / "sharded", bits=4, group_size=32, act_order=True, shards=3, config_style="config_json")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == 3
    assert torch.equal(logits(tmp_path / "sharded"), logits(gptq_dir))


def test_separate_checkpoint_file_with_explicit_bits(tmp_path, gptq_dir):
    """The original project's style: config + tokenizer in a folder, the weights file elsewhere."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gptq_dir / name, folder / name)
    ckpt = tmp_path / "llama-4bit-32g.safetensors"
    shutil.copy(gptq_dir / "model.safetensors", ckpt)
    # act-order g_idx is in the file, so only bits and group size are needed
    assert torch.equal(logits(folder, checkpoint=ckpt, wbits=4, groupsize=32), logits(gptq_dir))
    assert "--wbits" in error_of(folder, checkpoint=ckpt)
    assert "8-bit" in error_of(folder, checkpoint=ckpt, wbits=8, groupsize=32) or "4-bit" in error_of(folder, checkpoint=ckpt, wbits=8, groupsize=32)
    assert "group" in error_of(folder, checkpoint=ckpt, wbits=4, groupsize=64)


def test_pickle_needs_opt_in(tmp_path, gptq_dir):
    folder = tmp_path / "model"
    shutil.copytree(gptq_dir, folder)
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    ckpt = tmp_path / "model.pt"
    torch.save(sd, ckpt)
    message = error_of(folder, checkpoint=ckpt)
    assert "--allow-pickle" in message
    assert torch.equal(logits(folder, checkpoint=ckpt, allow_pickle=True), logits(gptq_dir))


def test_contradicting_settings(gptq_dir):
    assert "--wbits 8 contradicts" in error_of(gptq_dir, wbits=8)
    assert "--groupsize 128 contradicts" in error_of(gptq_dir, groupsize=128)


def test_missing_empty_and_truncated(tmp_path, gptq_dir):
    assert "does not exist" in error_of(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "config.json" in error_of(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(gptq_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in error_of(broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "corrupt" in error_of(broken) or "truncated" in error_of(broken)


def test_shape_mismatch_and_missing_tensor(tmp_path, gptq_dir):
    wrong = tmp_path / "wrong"
    shutil.copytree(gptq_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert "don't belong together" in error_of(wrong)
    partial = tmp_path / "partial"
    shutil.copytree(gptq_dir, partial)
    sd = load_file(str(partial / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.scales"]
    save_file(sd, str(partial / "model.safetensors"))
    assert "model.layers.1.mlp.down_proj.scales" in error_of(partial)


def test_fp16_weights_round_to_nearest_on_load(tmp_path):
    model = hf_model(seed=2)
    save_fp16(model, tmp_path, dtype=torch.float32)
    rtn = logits(tmp_path, wbits=4, groupsize=64)
    expected = {name: rtn_quantize(m.weight.data, 4, 64).dequantize() for name, m in model.model.named_modules()
                if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        reference = with_weights(model, {f"model.{k}": v for k, v in expected.items()})(TOKENS).logits
    assert not torch.allclose(rtn, logits(tmp_path), atol=1e-3)
    assert torch.allclose(rtn, reference, atol=2e-3)


def test_device_maps(tmp_path):
    _, raw = load_device_map("cpu")
    assert plan_devices(raw, 4).device_for("model.layers.3.mlp") == "cpu"
    own = tmp_path / "map.json"
    own.write_text(json.dumps({"layers": {"0-1": "cpu", "2-3": "cpu"}, "lm_head": "cpu"}))
    label, raw = load_device_map(own)
    plan = plan_devices(raw, 4, label)
    assert plan.device_for("model.layers.2.self_attn.q_proj") == "cpu"
    with pytest.raises(UsageError, match="outside 0-3"):
        plan_devices({"layers": {"0-9": "cpu"}}, 4)
    with pytest.raises(UsageError, match="unknown key"):
        plan_devices({"layerz": {}}, 4)
    own.write_text("{not json")
    with pytest.raises(UsageError, match=r"map.json:1:2: broken JSON"):
        load_device_map(own)
    if not torch.cuda.is_available():
        with pytest.raises(TalisError, match="no CUDA GPU"):
            plan_devices({"device": 0}, 4)
