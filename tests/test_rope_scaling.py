"""Dynamic NTK and YaRN rope scaling against transformers' LlamaForCausalLM: the frequencies themselves, the full
forward, a cached prefill then token-by-token decode, greedy generation, the fast decode step, --max-seq-len's
limit."""

import pytest
import torch

from quant_kernels.fuse import fuse_model
from talis_cli import rope
from talis_cli.config import ModelArgs
from talis_cli.engine import check_max_seq_len
from talis_cli.errors import UsageError
from talis_cli.fast_decode import CudaGraphDecoder
from tests.hf_parity import (assert_close, assert_greedy_matches, hf_cached_logits, hf_random, random_tokens,
                             talis_cached_logits, talis_model)
from tests.test_fast_decode import DEVICE, assert_decode_step_matches_plain_forward, greedy, needs_cuda, tiny_model
from tests.tiny_models import tiny_config

ORIGINAL = 64  # max_position_embeddings of the dynamic models: sequences of 100 tokens pass it
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
YARN = {
    "plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "mscale-no-truncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                           "beta_fast": 16, "beta_slow": 2, "mscale": 2.0, "mscale_all_dim": 1.0, "truncate": False},
    "attention-factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "attention_factor": 1.3},
}


def llama(rope_scaling, seed: int = 0, max_position_embeddings: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    return hf_random(LlamaConfig, LlamaForCausalLM, seed, rope_scaling=rope_scaling, num_key_value_heads=2,
                     max_position_embeddings=max_position_embeddings)


def forget_scale(hf) -> None:
    """transformers keeps the dynamic scale of the longest sequence it has seen until one shorter than
    max_position_embeddings comes: give it one, so each reference starts as a freshly loaded model."""
    with torch.no_grad():
        hf(torch.ones(1, 1, dtype=torch.long))


# --- the frequencies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [*sorted(YARN), "top-level-original"])
def test_yarn_frequencies_and_attention_factor_equal_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if case == "top-level-original":  # Phi-3 style: config.json's own key wins over the rope dict's
        cfg = tiny_config(rope_scaling=dict(YARN["plain"]), max_position_embeddings=128,
                          original_max_position_embeddings=16)
    else:
        cfg = tiny_config(rope_scaling=dict(YARN[case]), max_position_embeddings=128)
    theirs, factor = ROPE_INIT_FUNCTIONS["yarn"](LlamaConfig(**cfg))
    args = ModelArgs.from_hf_config(cfg)
    torch.testing.assert_close(rope.inv_freq(args), theirs, rtol=1e-6, atol=0)
    assert rope.attention_factor(args) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("seq_len", [10, ORIGINAL, ORIGINAL + 1, 300])
def test_dynamic_frequencies_equal_transformers(seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config(rope_scaling=dict(DYNAMIC), max_position_embeddings=ORIGINAL)
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](LlamaConfig(**cfg), seq_len=torch.tensor(seq_len))
    ours = rope.dynamic_inv_freq(ModelArgs.from_hf_config(cfg), torch.arange(seq_len))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    unscaled = rope.inv_freq(ModelArgs.from_hf_config(tiny_config()))
    assert torch.allclose(ours, unscaled, rtol=1e-6) == (seq_len <= ORIGINAL)


# --- logits -----------------------------------------------------------------------------------------------------
def test_dynamic_short_sequence_is_unscaled(tmp_path):
    """Below max_position_embeddings nothing is scaled: the logits equal transformers' and the unscaled model's."""
    hf = llama(DYNAMIC, seed=1, max_position_embeddings=ORIGINAL)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(2, 40, seed=1)
    model.clear_cache()
    with torch.no_grad():
        ours = model(tokens)
        assert_close(ours, hf(tokens).logits)
        model.args.rope_scaling = None
        assert_close(ours, model(tokens))
        model.args.rope_scaling = dict(DYNAMIC)
    forget_scale(hf)
    assert_close(talis_cached_logits(model, tokens, [30]), hf_cached_logits(hf, tokens, [30]))


@pytest.mark.parametrize("bounds", [[40], [80]])
def test_dynamic_past_the_original_length_matches_transformers(tmp_path, bounds):
    """100 tokens on a 64-position model: a prefill below (or past) 64, then decode steps, each rotating its new
    query and key for the sequence length so far; cached keys keep their rotation."""
    hf = llama(DYNAMIC, seed=2, max_position_embeddings=ORIGINAL)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(1, 100, seed=2)
    model.clear_cache()
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits)
    forget_scale(hf)
    theirs = hf_cached_logits(hf, tokens, bounds)
    assert_close(talis_cached_logits(model, tokens, bounds), theirs)
    with torch.no_grad():  # the scale changes the logits past 64 (the test sees it)
        assert (theirs[:, ORIGINAL + 5:] - hf(tokens).logits[:, ORIGINAL + 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(YARN))
def test_yarn_matches_transformers(tmp_path, case):
    hf = llama(dict(YARN[case]), seed=3)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    tokens = random_tokens(1, 100, seed=3)
    model.clear_cache()
    with torch.no_grad():
        full = hf(tokens).logits
        assert_close(model(tokens), full)
    assert_close(talis_cached_logits(model, tokens, [40]), full)


@pytest.mark.parametrize("scaling", ["dynamic", "yarn"])
def test_greedy_generation_matches_transformers(tmp_path, scaling):
    """A 40-token prompt and 50 new tokens: with dynamic scaling the decode passes the original 64 positions."""
    hf = llama(dict(DYNAMIC) if scaling == "dynamic" else dict(YARN["plain"]), seed=4,
               max_position_embeddings=ORIGINAL if scaling == "dynamic" else 128)
    model = talis_model(hf, tmp_path, max_seq_len=128)
    assert_greedy_matches(hf, model, tmp_path, random_tokens(1, 40, seed=4)[0].tolist(), 50, max_seq_len=128)


# --- the fast decode step and the context limit ---------------------------------------------------------------
@pytest.mark.parametrize("scaling", [DYNAMIC, YARN["mscale-no-truncate"]])
def test_decode_step_matches_plain_forward(scaling):
    """Two left-padded rows decoded past max_position_embeddings 4: with dynamic scaling each step's table entries
    follow the longest row."""
    model = tiny_model(seed=7, device=DEVICE, num_key_value_heads=2, max_position_embeddings=4,
                       rope_scaling=dict(scaling, original_max_position_embeddings=2))
    fuse_model(model)
    assert_decode_step_matches_plain_forward(model)


@pytest.mark.parametrize("scaling,max_position_embeddings,limit", [
    (DYNAMIC, 64, 128),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 32768, 131072),  # Qwen2.5
    ({"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}, 163840, 163840),  # DeepSeek
    ({"rope_type": "yarn", "factor": 4.0}, 4096, 16384),  # the original length defaults to max_position_embeddings
])
def test_max_seq_len_limit(scaling, max_position_embeddings, limit):
    args = ModelArgs.from_hf_config(tiny_config(rope_scaling=scaling, max_position_embeddings=max_position_embeddings))
    assert check_max_seq_len(limit, args) == limit
    with pytest.raises(UsageError) as error:
        check_max_seq_len(limit + 1, args)
    assert str(error.value) == (f"--max-seq-len {limit + 1} exceeds what the model was trained for ({limit}); "
                                f"use at most {limit}")


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_match_with_dynamic_rope():
    """Dynamic NTK on a 64-position model: the graphs' rotary entries follow each step's length past 64."""
    model = tiny_model(dtype=torch.float16, device="cuda", num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                       rope_scaling=dict(DYNAMIC))
    fuse_model(model)
    prompt = torch.randint(0, 4096, (1, 50), device="cuda")
    plain = greedy(model, prompt, 100)
    assert greedy(model, prompt, 100, CudaGraphDecoder(model)) == plain
