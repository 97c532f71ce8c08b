"""Mistral-style sliding-window attention in every path, against transformers' MistralForCausalLM (eager attention):
the full forward, a cached prefill, a chunk at start_pos > 0, token-by-token decode, a left-padded batch, greedy
generation; the Triton decode attention against plain torch; the fast decode step (CUDA graphs on a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from quant_kernels import triton_ops
from quant_kernels.fuse import fuse_model
from talis_cli.config import ModelArgs
from talis_cli.errors import TalisError
from talis_cli.fast_decode import CudaGraphDecoder, bucket, buckets
from talis_cli.model import apply_rotary
from tests.hf_parity import (assert_close, assert_greedy_matches, hf_cached_logits, hf_random, random_tokens,
                             talis_cached_logits, talis_model)
from tests.test_fast_decode import assert_decode_step_matches_plain_forward, greedy, needs_cuda, tiny_model
from tests.test_triton_ops import DEVICE, poisoned, rel_err, rotary_tables
from tests.tiny_models import tiny_config

WINDOW = 16


def mistral(seed: int = 0, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    return hf_random(MistralConfig, MistralForCausalLM, seed, sliding_window=WINDOW, num_key_value_heads=2,
                     **overrides)


@pytest.mark.parametrize("extra", [{}, {"sliding_window": None}, {"sliding_window": 24},
                                   {"use_sliding_window": False, "sliding_window": 24}])
@pytest.mark.parametrize("model_type", ["mistral", "llama"])
def test_config_window_is_what_transformers_reads(model_type, extra):
    from transformers import AutoConfig

    cfg = tiny_config(model_type=model_type, **extra)
    expected = AutoConfig.for_model(**cfg).sliding_window if model_type == "mistral" else None  # LLaMA has none
    if cfg.get("use_sliding_window") is False:
        expected = None  # Qwen2's spelling: transformers' Qwen2Config drops the window
    assert ModelArgs.from_hf_config(cfg).sliding_window == expected


@pytest.mark.parametrize("window", [0, "wide"])
def test_bad_window_is_one_line(window):
    with pytest.raises(TalisError) as error:
        ModelArgs.from_hf_config(tiny_config(model_type="mistral", sliding_window=window))
    assert "\n" not in str(error.value) and str(error.value).startswith("config.json: ")
    assert "sliding_window" in str(error.value) or "wrong type" in str(error.value)


def test_full_forward_matches_mistral(tmp_path):
    hf = mistral(seed=1)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(2, 100)
    model.clear_cache()
    with torch.no_grad():
        theirs = hf(tokens).logits
        assert_close(model(tokens), theirs)
        # without the window the logits past it differ: the test sees the window
        model.args.sliding_window = None
        assert (model(tokens)[:, WINDOW + 4:] - theirs[:, WINDOW + 4:]).abs().max() > 100 * 1e-4


@pytest.mark.parametrize("bounds", [[40], [10, 50]])
def test_cached_prefill_chunk_and_decode_match_mistral(tmp_path, bounds):
    """A prefill, (a chunk at start_pos > 0, as a chat's prefix reuse runs it), then one token per step."""
    hf = mistral(seed=2)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(1, 90, seed=2)
    with torch.no_grad():
        full = hf(tokens).logits
    ours = talis_cached_logits(model, tokens, bounds)
    assert_close(ours, full)
    assert_close(ours, hf_cached_logits(hf, tokens, bounds))


def test_left_padded_batch_matches_mistral(tmp_path):
    hf = mistral(seed=3)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(2, 70, seed=3)
    padded = tokens.clone()
    padded[1, :9], padded[1, 9:] = 0, tokens[1, :61]  # row 1: a 61-token prompt behind 9 padding slots
    pad_lens = torch.tensor([0, 9])
    model.setup_cache(2, 128)
    with torch.no_grad():
        prefill = model(padded[:, :50], start_pos=0, pad_lens=pad_lens)
        steps = torch.cat([model(padded[:, i:i + 1], start_pos=i, pad_lens=pad_lens) for i in range(50, 70)], 1)
        ours = torch.cat([prefill, steps], dim=1)
        assert_close(ours[0], hf(tokens[:1]).logits[0])
        assert_close(ours[1, 9:], hf(tokens[1:, :61]).logits[0])


def test_greedy_generation_matches_mistral(tmp_path):
    hf = mistral(seed=4)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    assert_greedy_matches(hf, model, tmp_path, random_tokens(1, 12, seed=4)[0].tolist(), 40, max_seq_len=128)


# --- the Triton decode attention ----------------------------------------------------------------------------
def windowed_reference(q, k, v, cos, sin, slot, pad_lens, k_cache, v_cache, window):
    """Plain torch: rotary, cache write at `slot`, softmax over slots [max(pad, slot - window + 1), slot]."""
    B, hd = q.shape[0], cos.shape[1]
    n_heads, n_kv_heads = q.shape[1] // hd, k_cache.shape[1]
    positions = (slot - pad_lens).clamp(min=0)
    c, s = cos[positions][:, None, None], sin[positions][:, None, None]
    q = apply_rotary(q.view(B, n_heads, 1, hd), c, s)
    k_cache[:B, :, slot] = apply_rotary(k.view(B, n_kv_heads, 1, hd), c, s)[:, :, 0]
    v_cache[:B, :, slot] = v.view(B, n_kv_heads, hd)
    lo = max(0, slot - window + 1)
    keys = torch.arange(lo, slot + 1, device=q.device)
    mask = (keys[None, :] >= pad_lens[:, None])[:, None, None]
    y = F.scaled_dot_product_attention(q.float(), k_cache[:B, :, lo:slot + 1].float(),
                                       v_cache[:B, :, lo:slot + 1].float(), attn_mask=mask,
                                       enable_gqa=n_kv_heads != n_heads)
    return y.reshape(B, n_heads * hd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("slot,window,capacity", [(150, 20, 20), (150, 100, 128), (10, 20, 20), (70, 33, 64)])
def test_decode_attention_reads_only_the_window(dtype, slot, window, capacity):
    B, n_heads, n_kv_heads, hd, S = 2, 4, 2, 32, 200
    gen = torch.Generator().manual_seed(slot + window)
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    cos, sin = rotary_tables(S, hd, dtype)
    k_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    lo = max(0, slot - window + 1)
    k_cache[:, :, :lo] = float("nan")  # slots before the window are never read
    v_cache[:, :, :lo] = float("nan")
    k_cache[:, :, slot:] = float("nan")
    v_cache[:, :, slot:] = float("nan")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pad_lens = torch.tensor([0, 5], device=DEVICE)
    expected = windowed_reference(q, k, v, cos, sin, slot, pad_lens, k_ref, v_ref, window)
    out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor([slot], device=DEVICE), pad_lens, k_cache,
                                      v_cache, capacity, n_sms=4, out=poisoned((B, n_heads * hd), dtype),
                                      window=window)
    assert not out.isnan().any()
    assert rel_err(out, expected) < 2e-3
    torch.testing.assert_close(k_cache[:, :, slot], k_ref[:, :, slot], rtol=1e-3, atol=1e-3)


# --- the fast decode step -------------------------------------------------------------------------------------
def test_buckets_stop_at_the_window():
    assert buckets(2048, 300) == [128, 256, 300] and buckets(2048, 4096) == buckets(2048) == buckets(2048, None)
    assert buckets(2048, 32) == [32] and bucket([32], 1000) == 32
    assert bucket([128, 256, 300], 127) == 128 and bucket([128, 256, 300], 299) == 300
    assert bucket([128, 256, 300], 1500) == 300


def test_decode_step_with_window_matches_plain_forward():
    """Prefill 6 tokens of two left-padded rows, then steps at slots 6.. with a 4-slot window: each step reads the
    window's slots only, through a capacity of the window (the bucket every slot past it uses)."""
    model = tiny_model(seed=6, device=DEVICE, num_key_value_heads=2, model_type="mistral", sliding_window=4)
    fuse_model(model)
    assert_decode_step_matches_plain_forward(model, capacity=4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_match_with_window():
    """Window 160 on a 512-slot cache: buckets 128 and 160; the decode crosses both."""
    model = tiny_model(dtype=torch.float16, device="cuda", num_key_value_heads=2, max_position_embeddings=512,
                       model_type="mistral", sliding_window=160)
    fuse_model(model)
    prompt = torch.randint(0, 4096, (1, 100), device="cuda")
    plain = greedy(model, prompt, 120)
    runner = CudaGraphDecoder(model)
    assert greedy(model, prompt, 120, runner) == plain
    assert {key[1] for key in runner._graphs} == {128, 160}
