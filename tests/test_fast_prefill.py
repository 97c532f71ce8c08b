"""The fast prefill (talis_cli.fast_prefill) and its rotary + cache-write kernel, against the eager model.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes (float32 and fp16 on the CPU); the
tests marked gpu compare at a real shape on CUDA.
"""
import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.fuse import fuse_model
from quant_kernels.prefill_ops import query_blocks, ragged_attention, rotary_to_cache
from quant_kernels.quant_linear import QuantLinear
from talis_cli.fast_prefill import BUCKETS, PrefillRunner, buckets_up_to
from talis_cli.model import apply_rotary

from tests.test_fast_decode import random_quant, tiny_model
from tests.test_kv_cache import restore, snapshot

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


def ragged(segments, device=DEVICE):
    """positions (= slots), rows, slots int64 [N] of segments [(T, start, row)] laid back to back."""
    slots = [s for T, start, _ in segments for s in range(start, start + T)]
    rows = [row for T, _, row in segments for _ in range(T)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(slots), as_tensor(rows), as_tensor(slots)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("segments,n_heads,n_kv_heads,hd", [
    ([(37, 0, 1)], 4, 2, 32), ([(5, 11, 1)], 2, 2, 64), ([(1, 40, 2), (6, 3, 0)], 4, 1, 16)])
def test_rotary_to_cache_matches_eager_rotary_and_cache_write(dtype, segments, n_heads, n_kv_heads, hd):
    """Each token rotated at its own position and written to its own (row, slot); a padding token (slot -1) is
    rotated but stored nowhere; nothing else in the cache changes."""
    gen = torch.Generator().manual_seed(sum(T * 100 + start for T, start, _ in segments))
    n_slots = 64
    positions, rows, slots = ragged(segments)
    positions, rows, slots = (torch.cat([t, t.new_tensor([value])]) for t, value in ((positions, 7), (rows, 0),
                                                                                     (slots, -1)))
    N = positions.shape[0]
    qkv = torch.randn(N, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)  # strided views
    angles = torch.rand(n_slots, hd // 2, generator=gen) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)  # a table of every slot
    k_cache = torch.full((3, n_kv_heads, n_slots, hd), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    out = torch.full((N, n_heads * hd), float("nan"), dtype=dtype, device=DEVICE)

    got = rotary_to_cache(q, k, v, cos, sin, positions, rows, slots, k_cache, v_cache, out=out)

    c, s = cos[positions][None, None], sin[positions][None, None]  # [1, 1, N, hd]
    heads = lambda t, n: t.reshape(1, N, n, hd).transpose(1, 2)  # noqa: E731 (as Attention.forward shapes them)
    assert got is out
    assert_same_rounding(got.view(N, n_heads, hd).transpose(0, 1), apply_rotary(heads(q, n_heads), c, s)[0])
    k_rot, v_heads = apply_rotary(heads(k, n_kv_heads), c, s)[0], heads(v, n_kv_heads)[0]  # [kv_heads, N, hd]
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    for i, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        if slot >= 0:
            assert_same_rounding(k_cache[row, :, slot], k_rot[:, i])
            assert torch.equal(v_cache[row, :, slot], v_heads[:, i])
            written[row, :, slot] = True
    assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all()  # nothing else touched


def reference_attention(q, k_cache, v_cache, segments, window=None):
    """Plain torch: each query of `segments` [(T, start, row)] (q [N, heads*hd] back to back) over the keys of its
    row at slots 0..its own (the last `window` of them) -> [N, heads*hd] in fp32."""
    hd = k_cache.shape[-1]
    heads, group = q.shape[1] // hd, q.shape[1] // hd // k_cache.shape[1]
    out, at = [], 0
    for T, start, row in segments:
        keys = k_cache[row].float().repeat_interleave(group, 0)  # [heads, S, hd]
        values = v_cache[row].float().repeat_interleave(group, 0)
        for i in range(T):
            slot = start + i
            first = max(0, slot - window + 1) if window else 0
            query = q[at + i].float().view(heads, 1, hd)
            scores = query @ keys[:, first:slot + 1].transpose(1, 2) * hd ** -0.5
            out.append((scores.softmax(-1) @ values[:, first:slot + 1]).reshape(-1))
        at += T
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("segments,n_heads,n_kv_heads,hd,window", [
    ([(70, 0, 1)], 2, 2, 32, None),  # two query blocks, keys over two key blocks
    ([(5, 60, 2), (1, 9, 0), (9, 0, 1)], 4, 2, 16, None),  # a continued prompt past a key block, one token, GQA
    ([(12, 30, 0), (20, 0, 2)], 2, 1, 32, 8),  # a sliding window
])
def test_ragged_attention_matches_plain_attention(dtype, segments, n_heads, n_kv_heads, hd, window):
    """Fresh random queries and cache contents; unused block entries (zeros) and rows no block covers stay as
    they were."""
    gen = torch.Generator().manual_seed(len(segments) * 10 + hd)
    N = sum(T for T, _, _ in segments)
    q = torch.randn(N, n_heads * hd, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(3, n_kv_heads, 128, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(3, n_kv_heads, 128, hd, generator=gen).to(DEVICE, dtype)
    blocks = torch.tensor(query_blocks(segments) + [(0, 0, 0, 0)] * 2, device=DEVICE)
    out = torch.full((N + 3, n_heads * hd), 7.0, dtype=dtype, device=DEVICE)

    got = ragged_attention(q, k_cache, v_cache, blocks, window, out=out[:N])

    expected = reference_attention(q, k_cache, v_cache, segments, window)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)
    assert (out[N:] == 7.0).all()


def test_query_blocks_split_each_segment_into_runs_of_its_own_queries():
    assert query_blocks([(70, 5, 2), (3, 0, 0)], block_m=64) == [(2, 0, 64, 5), (2, 64, 6, 69), (0, 70, 3, 0)]


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


def test_a_prompt_continuing_a_longer_prefix_matches_forward():
    """A continued prompt shorter than what the row holds (a chat's next turn): its queries see the whole prefix."""
    model = tiny_model(seed=4, device=DEVICE)
    fuse_model(model)
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


def test_segments_outside_the_kv_cache_are_refused_before_any_kernel_writes():
    """Where a token goes is data the kernels do not check: a segment past the cache's last slot or row, or an
    empty one, raises ValueError naming it (as the eager forward fails on such a prompt) instead of writing into
    other heads' slots or past the cache, and the cache is left as it was."""
    model = tiny_model(seed=1, device=DEVICE, num_key_value_heads=2)
    model.setup_cache(2, 32)
    runner = PrefillRunner(model)
    before = caches(model)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"^segment 0 \(slots 30\.\.34 of cache row 0\) does not fit the KV "
                                             r"cache \(2 rows of 32 slots\)$"):
            runner(torch.tensor([[1, 2, 3, 4, 5]], device=DEVICE), 30)
        with pytest.raises(ValueError, match=r"^segment 1 \(slots 4\.\.4 of cache row 2\) does not fit"):
            runner.prefill_segments([([1, 2], 0, 0), ([3], 4, 2)])
        with pytest.raises(ValueError, match=r"^segment 1 \(cache row 1\) is empty$"):
            runner.prefill_segments([([1, 2], 0, 0), ([], 0, 1)])
        with pytest.raises(ValueError, match=r"^3 tokens for segments of 2 in all$"):
            runner.run(torch.tensor([1, 2, 3], device=DEVICE), [(2, 0, 0)])
    for (k, v), (k0, v0) in zip(caches(model), before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


# --- short prompts padded to a bucket (what a CUDA graph replays) -----------------------------------------------
def test_buckets_take_any_segments_that_fit_a_graph():
    """Where tokens go is data, so any start and row fit a bucket; not: graphs off, more tokens than the largest
    bucket, more segments than cache rows, dynamic NTK (its tables follow the real positions)."""
    model = tiny_model(seed=1, device=DEVICE)
    model.setup_cache(2, 64)
    runner = PrefillRunner(model, graphs=True)
    assert [runner.bucket(n) for n in (1, 9, 16, 17, 33, 64, 65, 512)] == [16, 16, 16, 32, 64, 64, 128, 512]
    assert runner.bucket(513) is None and runner.bucket(9, 2) == 16 and runner.bucket(9, 3) is None
    assert PrefillRunner(model).bucket(9) is None  # graphs off
    dynamic = tiny_model(seed=1, device=DEVICE, max_position_embeddings=16,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    dynamic.setup_cache(1, 64)
    assert PrefillRunner(dynamic, graphs=True).bucket(9) is None


def test_no_graph_applies_to_a_model_the_fused_path_does_not_take():
    """A head_dim that is not a power of two (24) runs the eager forward (`covers`), so no bucket applies and the
    server warm-up's `capture` does nothing, instead of running the fused kernels, which refuse that head_dim
    (the warm-up would stop there, before capturing its decode graphs)."""
    model = tiny_model(seed=4, device=DEVICE, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    model.setup_cache(2, 32)
    runner = PrefillRunner(model, graphs=True)
    assert runner.bucket(9) is None
    runner.capture(16, 1)
    assert runner._captured == {}


def test_buckets_up_to_a_token_count_are_those_its_forwards_replay():
    assert [buckets_up_to(n) for n in (1, 16, 17, 100, 512)] == [
        (16,), (16,), (16, 32), (16, 32, 64, 128), BUCKETS]
    assert buckets_up_to(4096) == BUCKETS


@pytest.mark.parametrize("kind,window", [("fp16", None), ("int8", None), ("fp8", 4)])
def test_segments_padded_to_a_bucket_give_the_same_logits_and_cache(kind, window):
    """What a CUDA graph replays, run eagerly: two segments (one continuing a cached prefix) padded to 32 tokens
    and to the cache's row count give each segment's logits and keys/values of a forward of its own (a sliding
    window too); the padding stores nothing (every slot no segment names keeps its old contents)."""
    model = tiny_model(seed=9, device=DEVICE, num_key_value_heads=2, **(
        {"model_type": "mistral", "sliding_window": window} if window else {}))
    fuse_model(model)
    model.kv_cache_kind = kind
    model.setup_cache(3, 64)
    gen = torch.Generator().manual_seed(3)
    segments = [(9, 0, 2), (6, 20, 0)]
    tokens = torch.randint(0, 4096, (15,), generator=gen).to(DEVICE)
    with torch.no_grad():
        for layer in model.model.layers:  # a prefix for the continued prompt, garbage elsewhere
            cache = layer.self_attn.kv_cache
            for tensor in cache.buffers():
                tensor.copy_(torch.randn(tensor.shape, generator=gen).to(tensor.dtype))
        caches = [layer.self_attn.kv_cache for layer in model.model.layers]
        before = [snapshot(cache) for cache in caches]
        runner = PrefillRunner(model)
        padded = runner.padded(tokens, segments, 32)
        after = [snapshot(cache) for cache in caches]
        for cache, saved in zip(caches, before):
            restore(cache, saved)
        each = torch.cat([runner(tokens[None, :9], 0, 2), runner(tokens[None, 9:], 20, 0)])
    assert padded.shape == each.shape == (2, 1, 4096)
    torch.testing.assert_close(padded, each, rtol=1e-4, atol=1e-4)
    for cache, got, old in zip(caches, after, before):
        for name, expected in cache.named_buffers():
            g, e, o = got[name], expected, old[name]
            torch.testing.assert_close(g.float(), e.float(), rtol=1e-4, atol=1e-4)
            named = torch.zeros(g.shape[:3], dtype=torch.bool)
            named[2, :, :9] = named[0, :, 20:26] = True
            assert torch.equal(g[~named], o[~named])


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
    tokens (the padding stores nothing)."""
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


@gpu
@needs_cuda
def test_cuda_graph_of_packed_and_continued_segments_matches_the_fused_prefill_at_7b_shape():
    """A server's step: newcomers packed into one forward, some continuing what their cache row holds, replayed
    as the CUDA graph of their bucket (each cache row at its own start) give the logits and keys/values of the
    prefill launched kernel by kernel. Rerunning the same segments writes the same values, so every path sees the
    same cache."""
    from talis_cli import bench

    model = bench.random_model(bench.shape_args("7B", 512), "gptq", 4, 128, act_order=False, device="cuda")
    model.setup_cache(4, 512)
    graphed, fused = PrefillRunner(model, graphs=True), PrefillRunner(model)
    gen = torch.Generator().manual_seed(1)
    ids = lambda T: torch.randint(0, model.args.vocab_size, (T,), generator=gen).tolist()  # noqa: E731
    layers = model.model.layers
    with torch.inference_mode():
        fused.prefill_segments([(ids(300), 0, 0), (ids(100), 0, 1)])  # the prefixes rows 0 and 1 continue
        for segments in ([(ids(40), 100, 1), (ids(70), 0, 2), (ids(1), 300, 0)],  # 111 tokens: the 128 graph
                         [(ids(200), 0, 3), (ids(150), 300, 0), (ids(9), 100, 1)]):  # 359: the 512 graph
            expected = fused.prefill_segments(segments).clone()
            written = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                       for layer in (layers[0], layers[-1])]
            for _ in range(3):  # marks the bucket, captures it, replays it
                got = graphed.prefill_segments(segments)
            assert rel_err(got, expected) < 1e-2
            for (k, v), layer in zip(written, (layers[0], layers[-1])):
                cache = layer.self_attn.kv_cache
                assert rel_err(cache.k, k) < 1e-2 and rel_err(cache.v, v) < 1e-2
    assert sorted(graphed._captured) == [128, 512]
    del model
    torch.cuda.empty_cache()


@pytest.mark.parametrize("model_type,window,rope_scaling", [
    ("llama", None, None), ("mistral", 4, None),
    ("llama", None, {"rope_type": "dynamic", "factor": 2.0}),  # past position 16 only the second segment scales
])
def test_segments_in_one_forward_match_a_forward_each(model_type, window, rope_scaling):
    """prefill_segments (a server's newcomers in one forward): each segment's last logits and its cache row equal
    those of its own __call__, whatever its start and row (with dynamic NTK, each with its own frequencies); rows
    no segment names stay untouched."""
    scaling = {"max_position_embeddings": 16, "rope_scaling": rope_scaling} if rope_scaling else {}
    model = tiny_model(seed=3, device=DEVICE, num_key_value_heads=2, model_type=model_type, sliding_window=window,
                       **scaling)
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
        each = torch.cat([runner(torch.tensor([ids], device=DEVICE), start, row)[:, -1]
                          for ids, start, row in segments])
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
