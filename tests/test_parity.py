"""talis' own forward against transformers' LlamaForCausalLM on the same (dequantized) weights."""

import pytest
import torch

from talis_cli.engine import Engine, LoadSettings
from talis_cli.generation import GenerationConfig
from tests.tiny_models import hf_model, save_fp16, save_gptq, with_weights

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    "mha-untied-4bit-g32": (dict(), dict(bits=4, group_size=32)),
    "gqa-tied-llama3-actorder-g64": (dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
                                          rope_scaling=LLAMA3_ROPE), dict(bits=4, group_size=64, act_order=True)),
    "gqa-headdim-linear-rope-8bit": (dict(num_key_value_heads=1, head_dim=64, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                                     dict(bits=8, group_size=128)),
    "mha-3bit-asym-g-1": (dict(), dict(bits=3, group_size=-1, sym=False)),
}


def _greedy_hf(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _greedy_talis(engine, prompt: list[int], n: int) -> list[int]:
    engine.eos_ids.clear()  # run the full n tokens, as transformers does with eos_token_id=None
    engine.generator.eos_ids = []
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=n)
    return [t for ev in engine.generator.stream(prompt, cfg) for t in ev.token_ids]


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_logits_and_greedy_match_transformers(tmp_path, case):
    cfg, qargs = CASES[case]
    hf = hf_model(seed=len(case), **cfg)
    dequantized = save_gptq(hf, tmp_path, **qargs)
    reference = with_weights(hf, dequantized)
    engine = Engine.load(LoadSettings(model_dir=tmp_path, device_map="cpu", backend="torch", max_seq_len=128))
    assert engine.quant.bits == qargs["bits"]
    tokens = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    engine.model.clear_cache()
    with torch.no_grad():
        ours = engine.model(tokens)
        theirs = reference(tokens).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
    engine.model.setup_cache(1, 128)
    prompt = tokens[0, :10].tolist()
    assert _greedy_talis(engine, prompt, 32) == _greedy_hf(reference, prompt, 32)


@pytest.mark.parametrize("tied", [False, True])
def test_fp16_checkpoint_matches_transformers(tmp_path, tied):
    hf = hf_model(seed=3, tie_word_embeddings=tied, num_key_value_heads=2)
    save_fp16(hf, tmp_path, dtype=torch.float32)
    engine = Engine.load(LoadSettings(model_dir=tmp_path, device_map="cpu", max_seq_len=64))
    assert engine.quant is None
    tokens = torch.randint(3, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    engine.model.clear_cache()
    with torch.no_grad():
        assert torch.allclose(engine.model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_cached_decode_and_left_padding_match_full_forward(tmp_path):
    hf = hf_model(seed=5, num_key_value_heads=2)
    save_fp16(hf, tmp_path, dtype=torch.float32)
    model = Engine.load(LoadSettings(model_dir=tmp_path, device_map="cpu", max_seq_len=64)).model
    tokens = torch.randint(3, 4096, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = hf(tokens).logits
        model.setup_cache(2, 64)
        prefill = model(tokens[:, :12], start_pos=0)
        steps = torch.cat([model(tokens[:, i:i + 1], start_pos=i) for i in range(12, 20)], dim=1)
        assert torch.allclose(prefill, full[:, :12], atol=1e-4)
        assert torch.allclose(steps, full[:, 12:], atol=1e-4)
        # row 1 holds a 15-token prompt behind 5 padding slots
        padded = tokens.clone()
        padded[1, :5], padded[1, 5:] = 0, tokens[1, :15]
        pad_lens = torch.tensor([0, 5])
        out = model(padded, start_pos=0, pad_lens=pad_lens)
        assert not out.isnan().any()
        assert torch.allclose(out[1, 5:], hf(tokens[1:2, :15]).logits[0], atol=1e-4)
        assert torch.allclose(out[0], full[0], atol=1e-4)
