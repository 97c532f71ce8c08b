"""The layer-by-layer quantizer: a tiny transformers LLaMA saved to disk, quantized, loaded back by our loader."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from talis_cli.tokenizer import load_tokenizer
from talis_cli.errors import TalisError, UsageError
from talis_cli.loaders import LoadRequest, pick_loader
from talis_cli.placement import DevicePlan
from talis_cli.quantize import quantize_model
from quant_kernels.quant_linear import QuantLinear
from tests.tiny_models import TOKENIZER_DIR, hf_model, save_fp16

DATA = Path(__file__).parent / "data" / "kjv"
CALIB = DATA / "calib.txt"
FAST = dict(nsamples=16, seqlen=128)  # small calibration: the tiny model needs no more


def load(folder: Path):
    return pick_loader(LoadRequest(model_dir=folder, plan=DevicePlan({"": "cpu"}), dtype=torch.float32)).load()


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    return save_fp16(hf_model(seed=0, num_key_value_heads=2), tmp_path_factory.mktemp("fp16") / "model")


@pytest.fixture(scope="module")
def heldout_tokens():
    """Text the quantizer did not see, [4, 64] token ids."""
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    ids = tokenizer.encode(DATA.joinpath("heldout.txt").read_text()[:20000], add_special_tokens=False)
    return torch.tensor(ids[:256]).view(4, 64)


@pytest.fixture(scope="module")
def fp_logits(fp16_folder, heldout_tokens):
    return load(fp16_folder).model(heldout_tokens)


def relative_error(logits, reference):
    return ((logits - reference).norm() / reference.norm()).item()


def test_gptq_output_loads_back_and_beats_rtn(fp16_folder, heldout_tokens, fp_logits, tmp_path):
    steps = []
    gptq_dir = quantize_model(fp16_folder, tmp_path / "gptq", bits=4, group_size=32, act_order=True,
                              calib_file=CALIB, progress=lambda step, total, msg: steps.append((step, total)), **FAST)
    rtn_dir = quantize_model(fp16_folder, tmp_path / "rtn", bits=4, group_size=32, method="rtn")
    assert steps == [(1, 2), (2, 2)]  # one report per finished layer (issue 15: a log gets one line per layer)

    loaded = load(gptq_dir)
    assert loaded.quant.bits == 4 and loaded.quant.group_size == 32 and loaded.quant.desc_act
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14  # 7 per layer; lm_head stays fp16
    # act-order: some layer's g_idx is not the plain i // group_size
    assert any(not torch.equal(m.g_idx, torch.arange(m.in_features, dtype=torch.int32) // 32) for m in linears)
    gptq_error = relative_error(loaded.model(heldout_tokens), fp_logits)
    rtn_error = relative_error(load(rtn_dir).model(heldout_tokens), fp_logits)
    assert gptq_error < 0.3
    assert gptq_error < 0.9 * rtn_error


def test_eight_bit_is_nearly_lossless_and_files_follow_autogptq(fp16_folder, heldout_tokens, fp_logits, tmp_path):
    out = quantize_model(fp16_folder, tmp_path / "q8", bits=8, group_size=-1, calib_file=CALIB,
                         true_sequential=False, sym=False, **FAST)
    assert relative_error(load(out).model(heldout_tokens), fp_logits) < 0.03

    settings = json.loads((out / "quantize_config.json").read_text())
    assert settings == dict(bits=8, group_size=-1, desc_act=False, sym=False, true_sequential=False,
                            damp_percent=0.01, static_groups=False, checkpoint_format="gptq",
                            model_file_base_name="model", quant_method="gptq")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == settings
    assert config["hidden_size"] == json.loads((fp16_folder / "config.json").read_text())["hidden_size"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (fp16_folder / name).read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.down_proj.qweight").shape == (256 * 8 // 32, 128)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.qzeros").shape == (1, 64 * 8 // 32)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.qzeros").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert not any(n.endswith("_proj.weight") for n in names)


def test_tied_embeddings_are_written_once(tmp_path):
    source = save_fp16(hf_model(seed=1, tie_word_embeddings=True), tmp_path / "tied")
    out = quantize_model(source, tmp_path / "q", bits=3, group_size=64, method="rtn")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = load(out).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gptq_without_calibration_text_is_refused(fp16_folder, tmp_path):
    with pytest.raises(UsageError, match="--calib"):
        quantize_model(fp16_folder, tmp_path / "q", bits=4, group_size=128)


def test_bad_settings_and_inputs_name_the_problem(fp16_folder, tmp_path):
    with pytest.raises(UsageError, match="--bits 5"):
        quantize_model(fp16_folder, tmp_path / "q", bits=5, method="rtn")
    with pytest.raises(UsageError, match="--group-size 100"):
        quantize_model(fp16_folder, tmp_path / "q", group_size=100, method="rtn")
    short = tmp_path / "short.txt"
    short.write_text("In the beginning")
    with pytest.raises(TalisError, match="tokens of calibration text"):
        quantize_model(fp16_folder, tmp_path / "q", calib_file=short, **FAST)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(TalisError, match="not empty"):
        quantize_model(fp16_folder, occupied, method="rtn")
