"""The fast prefill (talis_cli.fast_prefill) and its rotary + cache-write kernel, against the eager model.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes (float32 and fp16 on the CPU); the
tests marked gpu compare at a real shape on CUDA.
"""
import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.fuse import fuse_model
from quant_kernels.prefill_ops import rotary_to_cache
from quant_kernels.quant_linear import QuantLinear
from talis_cli.fast_prefill import PrefillRunner
from talis_cli.model import apply_rotary

from tests.test_fast_decode import random_quant, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- the kernel ---------------------------------------------------------------------------------------------------
def assert_same_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit under the interpreter (the same roundings as the eager ops); on a GPU within one rounding step
    of the dtype: the compiler may fuse the kernel's multiply and add into one FMA (one rounding fewer)."""
    if got.is_cuda:
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, expected, rtol=eps, atol=eps)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T,start,n_heads,n_kv_heads,hd", [(37, 0, 4, 2, 32), (5, 11, 2, 2, 64), (1, 40, 4, 1, 16)])
def test_rotary_to_cache_matches_eager_rotary_and_cache_write(dtype, T, start, n_heads, n_kv_heads, hd):
    gen = torch.Generator().manual_seed(T * 100 + start)
    slots = 64
    qkv = torch.randn(T, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)  # strided views
    angles = torch.rand(T, hd // 2, generator=gen) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    k_cache = torch.full((3, n_kv_heads, slots, hd), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    out = torch.full((n_heads, T, hd), float("nan"), dtype=dtype, device=DEVICE)

    got = rotary_to_cache(q, k, v, cos, sin, k_cache[1], v_cache[1], start, out=out)

    c, s = cos[None, None], sin[None, None]  # [1, 1, T, hd]
    heads = lambda t, n: t.reshape(1, T, n, hd).transpose(1, 2)  # noqa: E731 (as Attention.forward shapes them)
    assert_same_rounding(got, apply_rotary(heads(q, n_heads), c, s)[0])
    assert_same_rounding(k_cache[1, :, start:start + T], apply_rotary(heads(k, n_kv_heads), c, s)[0])
    assert torch.equal(v_cache[1, :, start:start + T], heads(v, n_kv_heads)[0])
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    written[1, :, start:start + T] = True
    assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all()  # nothing else touched


# --- the whole prefill against Transformer.forward -------------------------------------------------------------
def caches(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's cached keys and values."""
    return [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone()) for layer in model.model.layers]


def assert_prefill_matches_forward(model, T: int, start_pos: int = 0, cache_row: int | None = None,
                                   tolerance: float = 1e-4, rows: int = 1, slots: int = 64, close=None):
    """Fill slots 0..start_pos-1 with the eager forward, then prefill T more tokens with the runner and with the
    eager forward from the same cache; compare the last logits and every layer's cache (with `close(got,
    expected)`, default torch.testing.assert_close at `tolerance`)."""
    close = close or (lambda got, expected: torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance))
    gen = torch.Generator().manual_seed(T + start_pos)
    vocab = model.args.vocab_size
    prefix, tokens = (torch.randint(0, vocab, (1, n), generator=gen).to(DEVICE) for n in (start_pos, T))
    model.setup_cache(rows, slots)
    row = 0 if cache_row is None else cache_row
    with torch.no_grad():
        for layer in model.model.layers:  # other rows hold garbage the prefill must neither read nor write
            layer.self_attn.kv_cache.k.normal_()
            layer.self_attn.kv_cache.v.normal_()
        if start_pos:
            model(prefix, start_pos=0)  # row 0
            for layer in model.model.layers:
                cache = layer.self_attn.kv_cache
                cache.k[row], cache.v[row] = cache.k[0].clone(), cache.v[0].clone()
        before = caches(model)
        fast = PrefillRunner(model)(tokens, start_pos, cache_row)
        after = caches(model)
        for layer, (k, v) in zip(model.model.layers, before):
            cache = layer.self_attn.kv_cache
            cache.k.copy_(k)
            cache.v.copy_(v)
            if row:  # the eager forward writes row 0: give it row `row`'s prefix
                cache.k[0], cache.v[0] = k[row], v[row]
        plain = model(tokens, start_pos=start_pos, last_only=True)
    assert fast.shape == plain.shape == (1, 1, vocab)
    close(fast, plain)
    for layer, (k, v), (k0, v0) in zip(model.model.layers, after, before):
        cache = layer.self_attn.kv_cache
        close(k[row], cache.k[0])
        close(v[row], cache.v[0])
        others = [r for r in range(rows) if r != row]
        assert torch.equal(k[others], k0[others]) and torch.equal(v[others], v0[others])


@pytest.mark.parametrize("kv_heads,fused,T,start_pos", [(4, True, 9, 0), (2, True, 13, 7), (2, False, 1, 20),
                                                        (4, False, 5, 3)])
def test_prefill_matches_forward(kv_heads, fused, T, start_pos):
    model = tiny_model(seed=T, device=DEVICE, num_key_value_heads=kv_heads)
    if fused:
        fuse_model(model)
    assert_prefill_matches_forward(model, T, start_pos)


@pytest.mark.parametrize("pad_limit", [2048, 8], ids=["padded queries", "mask"])
def test_a_prompt_continuing_a_longer_prefix_matches_forward(pad_limit, monkeypatch):
    """A continued prompt shorter than what the row holds (a chat's next turn): causal attention over zero-padded
    queries up to PAD_LIMIT slots, an explicit mask beyond; both give the eager forward's logits and cache."""
    import talis_cli.fast_prefill as fast_prefill

    monkeypatch.setattr(fast_prefill, "PAD_LIMIT", pad_limit)
    model = tiny_model(seed=4, device=DEVICE)
    fuse_model(model)
    runner_segment = fast_prefill._Segment(0, 5, 12, 0, None, torch.device(DEVICE))
    assert (runner_segment.pad, runner_segment.mask is None) == ((12, True) if pad_limit > 17 else (0, False))
    assert_prefill_matches_forward(model, 5, start_pos=12)


def test_prefill_into_another_cache_row_leaves_the_others_alone():
    """The scheduler's prefill of one request into its own cache row (`cache_row`)."""
    model = tiny_model(seed=5, device=DEVICE, num_key_value_heads=2)
    fuse_model(model)
    assert_prefill_matches_forward(model, 7, start_pos=6, cache_row=2, rows=3)


@pytest.mark.parametrize("T,start_pos", [(11, 0), (6, 9), (3, 14)])
def test_prefill_with_a_sliding_window_matches_forward(T, start_pos):
    """Window 4: the prompt is longer than the window, and a continued prompt's queries see old slots only
    through it."""
    model = tiny_model(seed=2, device=DEVICE, num_key_value_heads=2, model_type="mistral", sliding_window=4)
    assert model.args.sliding_window == 4
    fuse_model(model)
    assert_prefill_matches_forward(model, T, start_pos)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_prefill_with_rope_scaling_matches_forward(rope_scaling):
    """YaRN's frequencies and attention factor come from the model's tables; dynamic NTK's follow the forward's
    largest position (past max_position_embeddings 16 here), as the eager forward computes them."""
    model = tiny_model(seed=4, device=DEVICE, max_position_embeddings=16, rope_scaling=rope_scaling)
    fuse_model(model)
    assert_prefill_matches_forward(model, 9, start_pos=12)


@pytest.mark.parametrize("T,start_pos", [(3, 0), (19, 4)])
def test_prefill_of_act_order_gptq_layers_matches_forward(T, start_pos):
    """GPTQ act-order layers on the Triton backend: T <= 8 rows (3 here: the interpreter runs the GEMV slowly) go
    to the GEMV with the norm and SiLU writing its input in its act-order (input_gather), more rows to dequantize +
    matmul. fp16 tolerances."""
    model = tiny_model(seed=6, dtype=torch.float16, device=DEVICE, num_key_value_heads=2)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for owner in (layer.self_attn, layer.mlp):
                for name, linear in list(owner.named_children()):
                    if isinstance(linear, torch.nn.Linear):
                        k, n = linear.in_features, linear.out_features
                        order = torch.randperm(k, generator=torch.Generator().manual_seed(i))
                        g_idx = gptq_format.default_g_idx(k, 32)[order]
                        quant = random_quant(k, n, 4, 32, g_idx, seed=i * 10 + len(name))
                        quant.scales.mul_(0.2)  # keeps activations moderate over the layers
                        setattr(owner, name, quant.to(DEVICE))
    fuse_model(model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.set_backend("triton")
    assert model.model.layers[0].self_attn.qkv_proj is not None
    assert_prefill_matches_forward(model, T, start_pos, tolerance=2e-2)


def test_the_runner_falls_back_to_the_eager_forward_for_a_batch_or_every_tokens_logits():
    model = tiny_model(seed=8, device=DEVICE)
    model.setup_cache(2, 32)
    tokens = torch.randint(0, 4096, (2, 5), device=DEVICE)
    runner = PrefillRunner(model)
    assert not runner.covers(tokens) and runner.covers(tokens[:1])
    with torch.no_grad():
        torch.testing.assert_close(runner(tokens), model(tokens, last_only=True))
        every = runner(tokens[:1], start_pos=0, last_only=False)
        assert every.shape == (1, 5, 4096)
        torch.testing.assert_close(every, model(tokens[:1], start_pos=0))


# --- short prompts padded to a bucket (what a CUDA graph replays) -----------------------------------------------
def test_buckets_apply_to_short_prompts_at_the_start_of_row_0_only():
    model = tiny_model(seed=1, device=DEVICE)
    model.setup_cache(1, 64)
    runner = PrefillRunner(model, graphs=True)
    assert [runner.bucket(T, 0, None) for T in (1, 9, 16, 17, 33, 64)] == [16, 16, 16, 32, 64, 64]
    assert runner.bucket(65, 0, None) is None  # the 128 bucket would not fit a 64-slot cache
    assert runner.bucket(9, 3, None) is None and runner.bucket(9, 0, 1) is None and runner.bucket(9, 0, 0) == 16
    assert PrefillRunner(model).bucket(9, 0, None) is None  # graphs off
    windowed = tiny_model(seed=1, device=DEVICE, model_type="mistral", sliding_window=8)
    windowed.setup_cache(1, 64)
    assert PrefillRunner(windowed, graphs=True).bucket(9, 0, None) is None


def test_a_prompt_padded_at_its_end_gives_the_same_logits_cache_and_decode_steps():
    """The real tokens' logits and keys/values equal the eager forward's; the padding's keys/values in the slots
    after the prompt are overwritten by each decode step (the Triton step and the eager one) before any query
    reads them, so the decoded logits equal those after an exact prefill."""
    from talis_cli.fast_decode import segments

    model = tiny_model(seed=9, device=DEVICE, num_key_value_heads=2)
    fuse_model(model)
    T, bucket, steps = 9, 16, 4
    tokens = torch.randint(0, 4096, (1, T), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    following = torch.randint(0, 4096, (steps,), generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def decoded(prefill, fast: bool):
        model.setup_cache(1, 64)
        step = segments(model, 1)[0]
        with torch.no_grad():
            logits = [prefill()[0, -1]]
            caches = [(layer.self_attn.kv_cache.k[0, :, :T].clone(), layer.self_attn.kv_cache.v[0, :, :T].clone())
                      for layer in model.model.layers]
            for i, token in enumerate(following):
                if fast:
                    step.tokens.copy_(token[None])
                    step.slot.fill_(T + i)
                    logits.append(step.run(capacity=64)[0])
                else:
                    logits.append(model(token[None, None], start_pos=T + i)[0, -1])
        return torch.stack(logits), caches

    exact, exact_caches = decoded(lambda: model(tokens, last_only=True), fast=False)
    for fast in (False, True):
        padded, padded_caches = decoded(lambda: PrefillRunner(model).padded(tokens, bucket), fast)
        torch.testing.assert_close(padded, exact, rtol=1e-4, atol=1e-4)
        for (k, v), (k0, v0) in zip(padded_caches, exact_caches):
            torch.testing.assert_close(k, k0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.model.layers[0].self_attn.kv_cache.k[0, :, T + steps], torch.zeros_like(k[:, 0]))


# --- where generation uses it -------------------------------------------------------------------------------------
class Recording(PrefillRunner):
    """The runner, noting each call's (prompt length, start position)."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def __call__(self, tokens, start_pos=0, cache_row=None):
        self.calls.append((tokens.shape[1], start_pos))
        return super().__call__(tokens, start_pos, cache_row)


def test_generator_prefills_one_prompt_through_the_runner_with_the_same_tokens():
    """A prompt, then a chat's continued prompt (prefilled from the first new token, start_pos > 0): the same
    greedy tokens as the eager forward's; a batch of two still takes the eager forward (left padding)."""
    from talis_cli.generation import GenerationConfig, Generator
    from tests.test_detokenize import byte_level_tokenizer
    from tests.test_generation import build_model, prompt, run

    tokenizer = byte_level_tokenizer()
    model = build_model(len(tokenizer), dtype=torch.float32).to(DEVICE)  # Triton: on CUDA, or interpreted
    fuse_model(model)
    plain, fast = Generator(model, tokenizer, (), 48), Generator(model, tokenizer, (), 48)
    fast.prefill = runner = Recording(model)
    cfg = GenerationConfig(temperature=0, max_new_tokens=6)
    first = prompt(tokenizer, "And God said")
    reply, _, _ = run(plain, first, cfg)
    assert run(fast, first, cfg)[0] == reply and runner.calls == [(len(first), 0)]
    follow_up = first + reply + prompt(tokenizer, " and")
    expected, _, _ = run(plain, follow_up, cfg)
    assert run(fast, follow_up, cfg)[0] == expected
    reused = fast.last_stats.reused_tokens
    assert reused == len(first) + len(reply) - 1 and runner.calls[-1] == (len(follow_up) - reused, reused)
    batch = [first, follow_up]
    assert list(fast.stream_batch(batch, cfg)) == list(plain.stream_batch(batch, cfg)) and len(runner.calls) == 2


# --- GPU: real shapes ---------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_rel_err_below(limit: float):
    def close(got, expected):
        assert not got.isnan().any() and rel_err(got, expected) < limit
    return close


@gpu
@needs_cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_prefill_matches_forward_at_7b_shape(act_order):
    """A random 7B (4-bit g128, q/k/v and gate/up fused): a 128-token prompt, then 37 more tokens after it. fp16:
    the last layer's o_proj and MLP run on one row here (the GEMV) and on all rows in the eager forward, so
    the two round differently; a wrong result is off by O(1)."""
    from talis_cli import bench

    model = bench.random_model(bench.shape_args("7B", 512), "gptq", 4, 128, act_order, device="cuda")
    close = assert_rel_err_below(1e-2)
    assert_prefill_matches_forward(model, 128, slots=512, close=close)
    assert_prefill_matches_forward(model, 37, start_pos=128, slots=512, close=close)
    del model
    torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_engine_generates_the_same_tokens_with_the_fast_prefill():
    """Loaded on the GPU, the generator prefills through the runner (accelerate), a chat's continued prompt
    too, and draws the eager forward's greedy tokens."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings
    from talis_cli.generation import GenerationConfig

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256))
    generator = engine.generator
    assert isinstance(generator.prefill, PrefillRunner)
    cfg = GenerationConfig(temperature=0, max_new_tokens=24)
    first = engine.encode("In the beginning God created the heaven and the earth. And the earth was")

    def tokens(prompt_ids):
        return [t for e in generator.stream(prompt_ids, cfg) for t in e.token_ids]

    runner, generator.prefill = generator.prefill, None
    try:  # the eager forward's tokens first: a reply, then the continued prompt's (prefilled from its new part)
        reply = tokens(first)
        follow_up = first + reply + engine.encode(" And God said", add_bos=False)
        expected = tokens(follow_up)
    finally:
        generator.prefill = runner
    engine.model.setup_cache(1, 256)  # a new cache: nothing is reused from the eager runs
    assert tokens(first) == reply
    assert tokens(follow_up) == expected
    assert generator.last_stats.reused_tokens == len(first) + len(reply) - 1  # the runner ran from there


@gpu
@needs_cuda
def test_cuda_graph_prefill_matches_the_fused_prefill_at_7b_shape():
    """Prompts padded to their bucket and replayed as CUDA graphs (captured at a bucket's second prompt) give the
    logits and keys/values of the prefill launched kernel by kernel; greedy decode after them draws the same
    tokens (the padding's slots are overwritten before they are read)."""
    from talis_cli import bench
    from talis_cli.fast_decode import CudaGraphDecoder

    model = bench.random_model(bench.shape_args("7B", 512), "gptq", 4, 128, act_order=True, device="cuda")
    model.setup_cache(1, 512)
    graphed, fused, decoder = PrefillRunner(model, graphs=True), PrefillRunner(model), CudaGraphDecoder(model)
    gen = torch.Generator().manual_seed(0)
    layers = model.model.layers

    def run(prefill, tokens):
        T = tokens.shape[1]
        logits = prefill(tokens, 0)[0, -1].clone()
        caches = [(layer.self_attn.kv_cache.k[0, :, :T].clone(), layer.self_attn.kv_cache.v[0, :, :T].clone())
                  for layer in (layers[0], layers[-1])]
        drawn = [logits.argmax().item()]
        for pos in range(T, T + 8):
            drawn.append(decoder(torch.tensor([[drawn[-1]]], device="cuda"), pos)[0].argmax().item())
        return logits, caches, drawn

    with torch.inference_mode():
        # 20: the 32 bucket's first prompt (not captured), 29: captured, 32: replayed; 100, 128: the 128 bucket
        for T in (20, 29, 32, 100, 128):
            tokens = torch.randint(0, model.args.vocab_size, (1, T), generator=gen).cuda()
            logits, caches, drawn = run(fused, tokens)
            g_logits, g_caches, g_drawn = run(graphed, tokens)
            assert rel_err(g_logits, logits) < 1e-2
            for (k, v), (gk, gv) in zip(caches, g_caches):
                assert rel_err(gk, k) < 1e-2 and rel_err(gv, v) < 1e-2
            assert g_drawn == drawn
    assert sorted(graphed._captured) == [32, 128]
    del model, decoder
    torch.cuda.empty_cache()


@pytest.mark.parametrize("model_type,window", [("llama", None), ("mistral", 4)])
def test_segments_in_one_forward_match_a_forward_each(model_type, window):
    """prefill_segments (a server's newcomers in one forward): each segment's last logits and its cache row equal
    those of its own __call__, whatever its start and row; rows no segment names stay untouched."""
    model = tiny_model(seed=3, device=DEVICE, num_key_value_heads=2, model_type=model_type, sliding_window=window)
    fuse_model(model)
    model.setup_cache(4, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:  # earlier slots of each row: what a continued prompt finds there
            layer.self_attn.kv_cache.k.normal_(generator=gen)
            layer.self_attn.kv_cache.v.normal_(generator=gen)
        before = caches(model)
        segments = [(torch.randint(0, 4096, (T,), generator=gen).tolist(), start, row)
                    for T, start, row in ((9, 0, 2), (1, 20, 0), (6, 5, 3))]
        runner = PrefillRunner(model)
        packed = runner.prefill_segments(segments)
        after = caches(model)
        for layer, (k, v) in zip(model.model.layers, before):
            layer.self_attn.kv_cache.k.copy_(k)
            layer.self_attn.kv_cache.v.copy_(v)
        each = torch.cat([runner(torch.tensor([ids], device=DEVICE), start, row)[:, -1] for ids, start, row in segments])
    assert packed.shape == (3, 4096)
    torch.testing.assert_close(packed, each, rtol=1e-4, atol=1e-4)
    for layer, (k, v), (k0, v0) in zip(model.model.layers, after, before):
        torch.testing.assert_close(k, layer.self_attn.kv_cache.k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, layer.self_attn.kv_cache.v, rtol=1e-4, atol=1e-4)
        assert torch.equal(k[1], k0[1]) and torch.equal(v[1], v0[1])


def test_segments_of_a_model_the_fused_path_does_not_take_run_eagerly():
    """A head_dim that is not a power of two (24 here) is not the fused kernels' (`covers` is False): the
    scheduler's packed prefill of several newcomers then gives each segment's eager forward, as __call__ does,
    instead of failing in the kernels (which would end every running request with an error)."""
    model = tiny_model(seed=4, device=DEVICE, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    assert model.args.head_dim == 24
    model.setup_cache(3, 32)
    segments = [([5, 6, 7, 8], 0, 0), ([9, 10], 0, 2)]
    with torch.no_grad():
        packed = PrefillRunner(model).prefill_segments(segments)
        model.setup_cache(3, 32)
        each = torch.cat([model(torch.tensor([ids], device=DEVICE), start_pos=start, last_only=True,
                                cache_row=row)[:, -1] for ids, start, row in segments])
    assert packed.shape == (2, model.args.vocab_size)
    assert torch.equal(packed, each)
