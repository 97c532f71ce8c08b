"""The 8-bit KV caches (talis_cli.kv_cache, --kv-cache int8 and fp8): quantization, the Triton kernels that write
and read them against the eager model's torch code, whole models (tokens, logits, perplexity), the scheduler, the
server and the CLI.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 at small shapes; the tests marked gpu compare at a
real shape on CUDA.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from quant_kernels import triton_ops
from quant_kernels.fuse import fuse_model
from quant_kernels.prefill_ops import rotary_to_cache
from talis_cli.fast_decode import segments
from talis_cli.fast_prefill import PrefillRunner
from talis_cli.kv_cache import KVCache, dequantize_heads, quantize_heads, slot_bytes
from talis_cli.model import apply_rotary

from tests.test_fast_decode import tiny_model
from tests.test_triton_ops import poisoned, rel_err, rotary_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- quantization -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip_error_is_at_most_absmax_over_254(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 50, 64, generator=gen) * torch.logspace(-3, 2, 50)[:, None]  # tiny to large vectors
    x[0, 0, 0] = 0.0  # an all-zero vector: scale stays finite, values come back 0
    x[1, 2, 3, 5] = 1e4  # one outlier: its vector keeps the bound, only coarser
    x = x.to(dtype)
    q, scale = quantize_heads(x, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert q.abs().max() == 127 and (q.abs().amax(-1)[x.abs().amax(-1) > 0] == 127).all()  # the absmax maps to 127
    back = dequantize_heads(q, scale, torch.float32)
    absmax = x.float().abs().amax(-1, keepdim=True)
    err = (back - x.float()).abs()
    assert (err <= absmax / 254 + absmax * 1e-6).all()  # fp32 rounding beside: ties (x / scale = n + 0.5) sit on it
    assert torch.equal(back[0, 0, 0], torch.zeros(64))


def test_fp8_round_trip_error_is_at_most_a_sixteenth_of_each_value():
    """e4m3 keeps 3 mantissa bits: half a step is at most |x| / 16 in the normal range, scale * 2^-10 below it;
    the absmax maps to 448 exactly."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 50, 64, generator=gen) * torch.logspace(-3, 2, 50)[:, None]).half()
    x[0, 0] = 0.0
    q, scale = quantize_heads(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    assert (q.float().abs().amax(-1)[x.abs().amax(-1) > 0] == 448).all()
    back = dequantize_heads(q, scale, torch.float32)
    err = (back - x.float()).abs()
    assert (err <= x.float().abs() / 16 + scale[..., None] * 2**-10 + x.float().abs() * 1e-6).all()
    assert torch.equal(back[0, 0], torch.zeros(64))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_8bit_cache_allocates_what_memory_planning_counts(kind):
    from talis_cli.model_info import kv_cache_bytes, memory_by_device

    model = tiny_model(num_key_value_heads=2)
    model.kv_cache_kind = kind
    model.setup_cache(3, 40)
    allocated = memory_by_device(model)["cpu"]["kv_cache_bytes"]
    args = model.args  # 2 layers, 2 kv heads, head_dim 32: 2 * 2 * (32 + 4) bytes a slot and layer
    assert slot_bytes(args.n_kv_heads, args.head_dim, kind) == 144
    assert allocated == kv_cache_bytes(args, 40, batch=3, kind=kind) == 2 * 144 * 40 * 3
    assert kv_cache_bytes(args, 40, batch=3, dtype_bytes=4) == 2 * (2 * 2 * 32 * 4) * 40 * 3  # fp16 kind, fp32 model


def test_unknown_cache_type_is_a_usage_error():
    from talis_cli.errors import UsageError

    model = tiny_model()
    model.kv_cache_kind = "fp4"
    with pytest.raises(UsageError, match="unknown KV cache type 'fp4'; choose one of fp16, int8, fp8"):
        model.setup_cache(1, 8)


def test_fp8_cache_is_refused_on_a_gpu():
    from talis_cli.errors import UsageError
    from talis_cli.kv_cache import check_devices

    with pytest.raises(UsageError, match=r"^--kv-cache fp8 is not yet verified on GPUs \(cuda:1\); use --kv-cache "
                                         r"int8$"):
        check_devices("fp8", ["cpu", "cuda:1"])
    check_devices("int8", ["cuda:1"])  # int8 runs on any GPU Triton supports
    check_devices("fp8", ["cpu"])  # the eager CPU path converts with torch


def test_bench_floor_and_memory_plan_count_the_int8_cache():
    """65B shape at 2048 context: the KV term of the bandwidth floor and the planned footprint (weights + cache)
    with the int8 cache; the issue's target is a peak of at most 38 GB, which the GPU layout does not meet yet:
    the plan counts the scales as the kernels' 4-byte scale/zero words (measured peak on an H200: 38.72 GB)."""
    from talis_cli import bench
    from talis_cli.memory_plan import footprint
    from talis_cli.model_info import kv_cache_bytes

    args = bench.shape_args("65B", 2048)
    int8_kv = 80 * 2 * 64 * (128 + 4) * 2048
    assert bench.floor_bytes(args, 4, 128, 2048, kv_cache="int8")["kv"] == int8_kv
    assert bench.floor_bytes(args, 4, 128, 2048)["kv"] == 80 * 2 * 64 * 128 * 2 * 2048
    planned = {kind: footprint(bench.gptq_tensor_shapes(args, 4, 128), args.n_layers,
                               kv_cache_bytes(args, 2048, kind=kind) // args.n_layers, 2).total
               for kind in ("fp16", "int8")}
    assert planned["fp16"] - planned["int8"] == 80 * 2 * 64 * (128 * 2 - 132) * 2048
    assert 38.2e9 < planned["int8"] < 38.8e9 < 41e9 < planned["fp16"]


def test_bench_refuses_an_unknown_cache_type_before_the_gpu_check():
    from talis_cli.bench import run_bench
    from talis_cli.errors import UsageError

    with pytest.raises(UsageError, match="unknown KV cache type 'int4'"):
        run_bench(shape="7B", kv_cache="int4")


# --- the Triton decode attention over an 8-bit cache --------------------------------------------------------------
def random_cache(batch: int, n_kv_heads: int, slots: int, hd: int, dtype, gen, kind: str = "int8") -> KVCache:
    """A KVCache of `kind` ("int8", "fp8") holding random codes and scales."""
    cache = KVCache(batch, slots, n_kv_heads, hd, dtype, DEVICE, kind)
    for name in ("k", "v"):
        if kind == "int8":
            codes = torch.randint(-127, 128, cache.k.shape, generator=gen, dtype=torch.int8)
        else:
            codes = (torch.randn(cache.k.shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        getattr(cache, name).copy_(codes)
        getattr(cache, f"{name}_scale").copy_(torch.rand(cache.k_scale.shape, generator=gen) * 0.02 + 0.005)
    return cache


def snapshot(cache: KVCache) -> dict:
    return {name: buffer.clone() for name, buffer in cache.named_buffers()}


def restore(cache: KVCache, saved: dict) -> None:
    for name, buffer in cache.named_buffers():
        buffer.copy_(saved[name])


def reference_step(q, k, v, cos, sin, slots, rows, cache: KVCache, pad_lens=None, window=None):
    """The eager model's decode attention on an 8-bit cache (Attention.forward with KVCache.update_rows): rotary,
    the new k, v quantized into slot slots[b] of cache row rows[b], SDPA over that row's dequantized slots
    [pad, slot] (the last `window` of them with a window). Returns fp32 [B, heads*hd]; `cache` is updated."""
    B, hd = q.shape[0], cos.shape[1]
    n_heads, n_kv_heads = q.shape[1] // hd, cache.k.shape[1]
    pad_lens = torch.zeros(B, dtype=torch.long, device=DEVICE) if pad_lens is None else pad_lens
    positions = (slots - pad_lens).clamp(min=0)
    c, s = cos[positions][:, None, None], sin[positions][:, None, None]  # [B, 1, 1, hd]
    q = apply_rotary(q.reshape(B, n_heads, 1, hd), c, s)
    k = apply_rotary(k.reshape(B, n_kv_heads, 1, hd), c, s)
    length = int(slots.max()) + 1
    keys, values = cache.update_rows(rows, slots, k, v.reshape(B, n_kv_heads, 1, hd), length)
    at = torch.arange(length, device=DEVICE)[None, :]
    mask = (at <= slots[:, None]) & (at >= pad_lens[:, None])
    if window is not None:
        mask = mask & (at > slots[:, None] - window)
    y = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask[:, None, None],
                                       enable_gqa=n_kv_heads != n_heads)
    return y.reshape(B, n_heads * hd)


def assert_same_codes(got, expected, rows: list[int] | None = None) -> None:
    """Equal 8-bit codes and scales in cache rows `rows` (default all), up to one rounding step; got, expected:
    KVCaches or snapshots. The rotated key of two paths may differ by one rounding step of its dtype (on a GPU an
    FMA where the eager ops round twice; on a CPU a matmul summed in another order with another thread count),
    which moves its scale by as much and a code by at most one step."""
    got, expected = (dict(c.named_buffers()) if isinstance(c, KVCache) else c for c in (got, expected))
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
    for name in ("k", "v"):
        a, b = pick(got[name]), pick(expected[name])
        if a.dtype == torch.int8:
            assert (a.int() - b.int()).abs().max() <= 1
        else:  # e4m3: one step is at most 1/8 of the value, 2^-9 among the subnormals
            assert ((a.float() - b.float()).abs() <= b.float().abs() / 8 + 2**-9).all()
        rtol = 1e-3
        torch.testing.assert_close(pick(got[f"{name}_scale"]), pick(expected[f"{name}_scale"]), rtol=rtol, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n_heads,n_kv_heads,slot,capacity", [(4, 2, 150, 256), (2, 1, 63, 64)])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_decode_attention_on_8bit_cache_matches_dequantizing_reference(dtype, n_heads, n_kv_heads, slot, capacity,
                                                                       kind):
    """One slot for a left-padded batch (GQA, split-K with tickets): the output equals SDPA over the dequantized
    cache, the new token is stored as the eager write stores it, and no other slot or row is touched."""
    B, hd, S = 2, 32, 300
    gen = torch.Generator().manual_seed(slot + capacity)
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)  # strided views
    cos, sin = rotary_tables(S, hd, dtype)
    cache = random_cache(B + 1, n_kv_heads, S, hd, dtype, gen, kind)
    cache.k_scale[:, :, slot:] = float("nan")  # the current slot and later ones are never read from the cache
    cache.v_scale[:, :, slot:] = float("nan")
    reference = random_cache(B + 1, n_kv_heads, S, hd, dtype, gen, kind)
    restore(reference, snapshot(cache))
    pad_lens = torch.tensor([0, min(3, slot)], device=DEVICE)
    rows, slots = torch.arange(B, device=DEVICE), torch.full((B,), slot, device=DEVICE)
    expected = reference_step(q, k, v, cos, sin, slots, rows, reference, pad_lens)
    for _ in range(2):  # a second launch finds the tickets reset
        out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor([slot], device=DEVICE), pad_lens,
                                          cache.k, cache.v, capacity, n_sms=4, out=poisoned((B, n_heads * hd), dtype),
                                          k_scale=cache.k_scale, v_scale=cache.v_scale)
        assert not out.isnan().any()
        assert rel_err(out, expected) < 2e-3
    assert_same_codes(cache, reference)  # slot `slot` of rows 0, 1 written as the eager write does, nothing else


@pytest.mark.parametrize("window,capacity,kind", [(None, 128, "int8"), (20, 20, "int8"), (20, 20, "fp8")])
def test_decode_attention_rows_on_8bit_cache_match_dequantizing_reference(window, capacity, kind):
    """Continuous batching on an 8-bit cache: row b at its own slot of cache row rows[b] (GQA, a sliding window);
    the spare lane (rows[3], the spare row) changes no request's row."""
    n_heads, n_kv_heads, hd, S, dtype = 4, 2, 32, 200, torch.float16
    slots, rows = [5, 70, 0, 0], [3, 0, 2, 4]
    B = len(slots)
    gen = torch.Generator().manual_seed(capacity + (window or 0))
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    cos, sin = rotary_tables(S, hd, dtype)
    cache = random_cache(5, n_kv_heads, S, hd, dtype, gen, kind)
    for slot, row in zip(slots, rows):  # each row's own slot and later ones are never read
        cache.k_scale[row, :, slot:] = float("nan")
        cache.v_scale[row, :, slot:] = float("nan")
    cache.k_scale[1], cache.v_scale[1] = float("nan"), float("nan")  # a row no lane uses
    reference = random_cache(5, n_kv_heads, S, hd, dtype, gen, kind)
    restore(reference, snapshot(cache))
    for scale in (reference.k_scale, reference.v_scale):  # the eager path reads (and masks) every row's slots
        scale.nan_to_num_(0.0)
    slots_t, rows_t = torch.tensor(slots, device=DEVICE), torch.tensor(rows, device=DEVICE)
    expected = reference_step(q[:3], k[:3], v[:3], cos, sin, slots_t[:3], rows_t[:3], reference, window=window)
    for _ in range(2):
        out = triton_ops.decode_attention(q, k, v, cos, sin, slots_t, torch.zeros(B, dtype=torch.long, device=DEVICE),
                                          cache.k, cache.v, capacity, n_sms=4, out=poisoned((B, n_heads * hd), dtype),
                                          window=window, rows=rows_t, k_scale=cache.k_scale, v_scale=cache.v_scale)
        assert rel_err(out[:3], expected) < 2e-3
    for scale in (cache.k_scale, cache.v_scale):
        scale.nan_to_num_(0.0)
    assert_same_codes(cache, reference, rows=[0, 1, 2, 3])  # row 4 is the spare lane's


# --- the fused prefill's cache write ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T,start,n_heads,n_kv_heads,hd", [(37, 0, 4, 2, 32), (5, 11, 2, 2, 64)])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_rotary_to_cache_writes_the_eager_8bit_cache(dtype, T, start, n_heads, n_kv_heads, hd, kind):
    gen = torch.Generator().manual_seed(T + start)
    qkv = torch.randn(T, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    angles = torch.rand(T, hd // 2, generator=gen) * 6.3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    cache = random_cache(3, n_kv_heads, 64, hd, dtype, gen, kind)
    reference = random_cache(3, n_kv_heads, 64, hd, dtype, gen, kind)
    restore(reference, snapshot(cache))
    positions = torch.arange(T, device=DEVICE)  # rows of the tables above
    rows, slots = torch.ones_like(positions), positions + start

    rotary_to_cache(q, k, v, cos, sin, positions, rows, slots, cache.k, cache.v, k_scale=cache.k_scale,
                    v_scale=cache.v_scale)

    heads = lambda t, n: t.reshape(1, T, n, hd).transpose(1, 2)  # noqa: E731 (as Attention.forward shapes them)
    c, s = cos[None, None], sin[None, None]
    reference.update(start, apply_rotary(heads(k, n_kv_heads), c, s), heads(v, n_kv_heads), row=1)
    assert_same_codes(cache, reference)  # rows 0 and 2 and the other slots untouched too


# --- whole models on the CPU: the fast paths against the eager model, int8 against fp16 ---------------------------
def quantized_model(kind: str = "int8", **overrides):
    model = tiny_model(seed=5, device=DEVICE, num_key_value_heads=2, **overrides)
    model.kv_cache_kind = kind
    return model


@pytest.mark.parametrize("window,kind", [(None, "int8"), (8, "int8"), (8, "fp8")])
def test_per_row_decode_step_on_8bit_cache_matches_decode_rows(window, kind):
    """The Triton decode step (rows at their own slots, as the scheduler runs it) against the eager decode_rows on
    the same int8 cache: logits, and the codes written into every real row."""
    extra = dict(model_type="mistral", sliding_window=window) if window else {}
    model = quantized_model(kind, **extra)
    fuse_model(model)
    model.setup_cache(4, 64)
    gen = torch.Generator().manual_seed(2)
    lengths, rows = [3, 20, 1], [2, 0, 1]
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    with torch.inference_mode():
        for n, row in zip(lengths, rows):
            model(torch.randint(0, 4096, (1, n), generator=gen).to(DEVICE), cache_row=row)
        (step,) = segments(model, 4, None, per_row=True)
        for i in range(2):
            tokens, slots = torch.randint(0, 4096, (3,), generator=gen), torch.tensor(lengths) + i
            before = [snapshot(c) for c in caches]
            step.inputs.copy_(torch.stack([torch.cat([tokens, torch.zeros(1, dtype=torch.long)]),
                                           torch.cat([slots, torch.zeros(1, dtype=torch.long)]),
                                           torch.tensor(rows + [3])]))
            fast = step.run(capacity=64)[:3].clone()
            after = [snapshot(c) for c in caches]
            for c, saved in zip(caches, before):
                restore(c, saved)
            plain = model.decode_rows(tokens.to(DEVICE), slots.to(DEVICE), torch.tensor(rows, device=DEVICE))
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
            for c, saved in zip(caches, after):
                assert_same_codes(saved, c, rows=[0, 1, 2])  # row 3 is the spare lane's
                restore(c, saved)


@pytest.mark.parametrize("start_pos,cache_row,window,kind", [(0, None, None, "int8"), (9, 2, None, "int8"),
                                                             (20, 1, 8, "int8"), (9, 2, None, "fp8")])
def test_fast_prefill_on_8bit_cache_matches_eager_forward(start_pos, cache_row, window, kind):
    """PrefillRunner (rotary_to_cache writing int8, ragged_attention reading it back dequantized) against the eager
    forward from the same cache: the last logits, and the same codes in every layer (with a sliding window, both
    read only the window's slots)."""
    model = quantized_model(kind, **(dict(model_type="mistral", sliding_window=window) if window else {}))
    fuse_model(model)
    model.setup_cache(3, 64)
    runner = PrefillRunner(model)
    gen = torch.Generator().manual_seed(4)
    row = cache_row or 0
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    with torch.inference_mode():
        if start_pos:
            model(torch.randint(0, 4096, (1, start_pos), generator=gen).to(DEVICE), cache_row=row)
        tokens = torch.randint(0, 4096, (1, 21), generator=gen).to(DEVICE)
        before = [snapshot(c) for c in caches]
        fast = runner(tokens, start_pos, cache_row).clone()
        after = [snapshot(c) for c in caches]
        for c, saved in zip(caches, before):
            restore(c, saved)
        plain = model(tokens, start_pos=start_pos, last_only=True, cache_row=row)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    for c, saved in zip(caches, after):
        assert_same_codes(saved, c)


def greedy_tokens(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens after `prompt` through the eager model's cache, and each step's logits."""
    model.setup_cache(1, len(prompt) + n)
    tokens, logits = [], []
    with torch.inference_mode():
        step = model(torch.tensor([prompt], device=DEVICE), last_only=True)[0, -1]
        for pos in range(len(prompt), len(prompt) + n):
            logits.append(step)
            tokens.append(int(step.argmax()))
            step = model(torch.tensor([[tokens[-1]]], device=DEVICE), start_pos=pos)[0, -1]
    return tokens, logits


def test_tiny_model_int8_cache_keeps_the_fp16_greedy_tokens():
    """A random tiny model (fp32, 4 KV heads of 32): 32 greedy tokens with the int8 cache equal the fp16 cache's,
    and every step's logits differ by less than 1% of their range."""
    model = tiny_model(seed=1, device=DEVICE)
    prompt = torch.randint(0, 4096, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected, expected_logits = greedy_tokens(model, prompt, 32)
    model.kv_cache_kind = "int8"
    got, got_logits = greedy_tokens(model, prompt, 32)
    assert got == expected
    for a, b in zip(got_logits, expected_logits):
        assert (a - b).abs().max() < 0.01 * (b.max() - b.min())


@pytest.fixture(scope="module")
def embedded():
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    return Engine.load(LoadSettings(device_map="cpu", max_seq_len=256, kv_cache="int8"))


def with_cache_kind(model, kind: str, run):
    """run() with the model's cache of type `kind`, then back to the fixture's int8 cache."""
    try:
        model.kv_cache_kind = kind
        return run()
    finally:
        model.kv_cache_kind = "int8"
        model.setup_cache(1, 256)


@pytest.mark.parametrize("kind,bound", [("int8", 0.1), ("fp8", 0.3)])
def test_embedded_model_8bit_cache_keeps_the_fp16_greedy_tokens(embedded, kind, bound):
    """The embedded model: 32 greedy tokens with the 8-bit cache equal the fp16 cache's (seen: identical for both),
    every step's logits within `bound` (seen: at most 0.034 int8, 0.19 fp8, of a range of ~26)."""
    model = embedded.model
    prompt = embedded.encode("In the beginning God created the heaven and the earth. And God said")
    got, got_logits = with_cache_kind(model, kind, lambda: greedy_tokens(model, prompt, 32))
    expected, expected_logits = with_cache_kind(model, "fp16", lambda: greedy_tokens(model, prompt, 32))
    assert got == expected
    assert max((a - b).abs().max().item() for a, b in zip(got_logits, expected_logits)) < bound


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_embedded_model_perplexity_with_8bit_cache_within_half_a_percent(embedded, kind):
    """The issue's bound: perplexity with the 8-bit cache within 0.5% of the fp16 cache's (first 4 windows of 256
    tokens of the held-out text; the whole file at --ctx 512 gave 38.6471 fp16, 38.6469 int8, 38.6804 fp8)."""
    from pathlib import Path

    from talis_cli.perplexity import perplexity

    text = (Path(__file__).parent / "data" / "kjv" / "heldout.txt").read_text()
    score = lambda: perplexity(embedded, text, ctx=256, max_windows=4)  # noqa: E731
    quantized, fp16 = with_cache_kind(embedded.model, kind, score), with_cache_kind(embedded.model, "fp16", score)
    assert quantized != fp16  # the windows went through the 8-bit cache
    assert abs(quantized - fp16) / fp16 < 0.005


def test_scheduler_with_int8_cache_gives_what_the_generator_gives(embedded):
    """Continuous batching over the int8 cache (chunked prefill into cache rows, decode_rows): each request's
    greedy text equals Generator.stream's alone on the same int8 cache."""
    from talis_cli.generation import GenerationConfig
    from talis_cli.scheduler import Scheduler

    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    prompts = [embedded.encode(t) for t in ("And God said", "In the beginning", "Blessed are the meek: for they")]
    alone = ["".join(e.text for e in embedded.generator.stream(p, cfg)) for p in prompts]
    scheduler = Scheduler(embedded.generator, max_batch=2, prefill_chunk=4)
    try:
        requests = [scheduler.submit(p, cfg, prompt_index=i) for i, p in enumerate(prompts)]
        scheduler.start()
        texts = ["".join(e.text for e in r.events(timeout=60)) for r in requests]
    finally:
        scheduler.stop(deadline_s=10.0)
    layer_cache = embedded.model.model.layers[0].self_attn.kv_cache
    assert layer_cache is None or layer_cache.k.dtype == torch.int8
    assert texts == alone


def test_tensor_parallel_ranks_keep_their_heads_in_an_int8_cache():
    """Two CPU ranks, each with half the KV heads in an int8 cache, against one process with the int8 cache."""
    from tests.test_tensor_parallel import assert_same_as_one_process, worker

    report = worker("--tokens", "16", "--cpu", "--kv-cache", "int8")
    assert report["cache"] == ["torch.int8", report["full_heads"][1] // 2]
    assert_same_as_one_process(report)


def test_server_with_int8_cache_completes_as_the_generator_does(embedded):
    """`talis serve --kv-cache int8` as its settings load it: the served model's cache is int8 and a greedy
    completion is the text Generator.stream gives on an int8 cache."""
    import httpx

    from talis_cli.generation import GenerationConfig
    from talis_cli.server.run import BackgroundServer, load_served
    from talis_cli.settings import RunSettings

    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    expected = "".join(e.text for e in embedded.generator.stream(embedded.encode("And God said"), cfg))
    server = BackgroundServer(load_served(RunSettings(kv_cache="int8", device_map="cpu"), cfg, 2, 8))
    try:
        cache = server.state.served.engine.model.model.layers[0].self_attn.kv_cache
        assert cache.k.dtype == torch.int8
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": "And God said", "max_tokens": 12, "temperature": 0})
    finally:
        server.close()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected


# --- the CLI ------------------------------------------------------------------------------------------------------
def talis(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talis_cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_generate_and_info_with_int8_cache(embedded):
    from talis_cli.generation import GenerationConfig
    from talis_cli.model_info import kv_cache_bytes

    run = talis("generate", "-p", "And God said", "-n", "16", "--temperature", "0", "--kv-cache", "int8",
                "--device-map", "cpu", "--max-seq-len", "256")
    assert run.returncode == 0, run.stderr
    ids = embedded.encode("And God said")
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    expected = "".join(e.text for e in embedded.generator.stream(ids, cfg))
    assert run.stdout == expected + "\n"
    info = talis("info", "--json", "--kv-cache", "int8", "--max-seq-len", "256", "--device-map", "cpu")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["kv_cache"] == "int8"
    assert report["memory"]["kv_cache_bytes"] == kv_cache_bytes(embedded.args, 256, kind="int8")


def test_cli_with_url_refuses_the_cache_type_in_one_line():
    """With --url the server's model answers: --kv-cache belongs to `talis serve`."""
    run = talis("generate", "--url", "http://127.0.0.1:9", "-p", "x", "--kv-cache", "int8", timeout=60)
    assert run.returncode == 2
    assert run.stderr == ("error: --kv-cache sets up a local model, and with --url the server's model answers; "
                          "drop --kv-cache (or --url), or pass it to `talis serve`\n")


def test_config_file_sets_the_cache_type_and_the_flag_wins(tmp_path):
    from talis_cli.settings import resolve_settings

    config = tmp_path / "talis.toml"
    config.write_text('kv-cache = "int8"\n')
    assert resolve_settings({}, config).load_settings().kv_cache == "int8"
    assert resolve_settings({"kv_cache": "fp16"}, config).load_settings().kv_cache == "fp16"
    assert resolve_settings({}).load_settings().kv_cache == "fp16"  # the default


def test_cli_unknown_cache_type_is_exit_2_in_one_line():
    run = talis("generate", "-p", "x", "--kv-cache", "bogus")
    assert run.returncode == 2
    assert run.stderr == "error: unknown KV cache type 'bogus'; choose one of fp16, int8, fp8 (--kv-cache)\n"
    assert run.stdout == ""


# --- GPU ----------------------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_decode_attention_on_8bit_cache_at_a_real_shape(kind):
    """32 heads of 128, 2048 slots, split-K: the kernel against SDPA over the dequantized cache."""
    n_heads, hd, S, slot = 32, 128, 2048, 2047
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 3 * n_heads * hd, generator=gen).to(DEVICE, torch.float16)
    q, k, v = qkv.split([n_heads * hd] * 3, dim=-1)
    cos, sin = rotary_tables(S, hd, torch.float16)
    cache = random_cache(2, n_heads, S, hd, torch.float16, gen, kind)
    reference = random_cache(2, n_heads, S, hd, torch.float16, gen, kind)
    restore(reference, snapshot(cache))
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    expected = reference_step(q, k, v, cos, sin, torch.tensor([slot], device=DEVICE), zero, reference)
    out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor([slot], device=DEVICE), zero, cache.k, cache.v,
                                      S, k_scale=cache.k_scale, v_scale=cache.v_scale)
    assert rel_err(out, expected) < 2e-3
    assert_same_codes(cache, reference)


@gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_on_int8_cache_random_7b():
    """A random 7B (act-order GPTQ): the CUDA-graph decode on the int8 cache gives the eager int8 path's 64 greedy
    tokens; against the fp16 cache the first token's logits point the same way (cosine similarity > 0.99, a sanity
    bound: the int8 error per cached value is at most 1/254 of its head vector's absmax)."""
    from talis_cli import bench
    from talis_cli.fast_decode import CudaGraphDecoder

    from tests.test_fast_decode import greedy

    args = bench.shape_args("7B", 256)
    model = bench.random_model(args, "gptq", 4, 128, act_order=True, device="cuda")
    prompt = torch.randint(0, args.vocab_size, (1, 32), device="cuda")
    with torch.inference_mode():
        model.setup_cache(1, 96)
        fp16 = model(prompt, last_only=True)[0, -1].float()
        model.kv_cache_kind = "int8"
        model.setup_cache(1, 96)
        int8 = model(prompt, last_only=True)[0, -1].float()
    cosine = F.cosine_similarity(int8, fp16, dim=0).item()
    assert cosine > 0.99, f"int8 vs fp16 cache: cosine similarity of the logits {cosine:.5f}"
    plain = greedy(model, prompt, 64)
    assert greedy(model, prompt, 64, CudaGraphDecoder(model)) == plain
    del model
    torch.cuda.empty_cache()


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["int8"])  # fp8 is refused on GPUs (kv_cache.check_devices says why)
def test_embedded_model_on_cuda_with_8bit_cache_matches_its_eager_path(kind):
    """The embedded model loaded for the GPU with --kv-cache int8 (fast prefill, CUDA-graph decode steps,
    per-row graphs in the scheduler): 64 greedy tokens equal the eager model's on the same cache, and the scheduler
    gives each request the text it gets alone."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings
    from talis_cli.generation import GenerationConfig
    from talis_cli.scheduler import Scheduler

    from tests.test_fast_decode import greedy

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=256, kv_cache=kind))
    model, runner = engine.model, engine.generator.fast_decode
    assert runner is not None and model.model.layers[0].self_attn.kv_cache.kind == kind
    prompt = torch.tensor([engine.encode("In the beginning God created")], device="cuda")
    assert greedy(model, prompt, 64, runner) == greedy(model, prompt, 64)
    cfg = GenerationConfig(temperature=0, max_new_tokens=40)
    prompts = [engine.encode(t) for t in ("And it came to pass", "Blessed are", "The LORD is my shepherd")]
    alone = ["".join(e.text for e in engine.generator.stream(p, cfg)) for p in prompts]
    scheduler = Scheduler(engine.generator, max_batch=4)
    scheduler.start()
    try:
        requests = [scheduler.submit(p, cfg) for p in prompts]
        got = ["".join(e.text for e in r.events(timeout=120)) for r in requests]
    finally:
        scheduler.stop(5)
    assert got == alone


def test_cli_bench_unknown_cache_type_is_exit_2_without_triton_too():
    """`talis bench --kv-cache bogus` on a CPU-only install (no triton, as README's set-up leaves it): the usage
    line (exit 2), not the missing-triton line."""
    code = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = ['talis', 'bench', '--kv-cache', 'bogus']; "
            "runpy.run_module('talis_cli', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: unknown KV cache type 'bogus'; choose one of fp16, int8, fp8 (--kv-cache)"]


def test_segments_in_one_forward_on_int8_cache_match_the_eager_forward_each():
    """prefill_segments (the scheduler's newcomers in one forward) on an int8 cache: a fresh prompt, one token
    after a cached prefix, and a prompt continuing a short prefix give each the
    eager forward's last logits from the same cache, and the same codes in the rows they write."""
    model = quantized_model("int8")
    fuse_model(model)
    model.setup_cache(4, 64)
    gen = torch.Generator().manual_seed(6)
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    segments = [(torch.randint(0, 4096, (T,), generator=gen).tolist(), start, row)
                for T, start, row in ((9, 0, 2), (1, 20, 0), (6, 5, 3))]
    with torch.inference_mode():
        for _, start, row in segments:  # the cached prefixes the continued prompts find
            if start:
                model(torch.randint(0, 4096, (1, start), generator=gen).to(DEVICE), cache_row=row)
        before = [snapshot(c) for c in caches]
        packed = PrefillRunner(model).prefill_segments(segments).clone()
        after = [snapshot(c) for c in caches]
        for c, saved in zip(caches, before):
            restore(c, saved)
        plain = torch.cat([model(torch.tensor([ids], device=DEVICE), start_pos=start, last_only=True,
                                 cache_row=row)[:, -1] for ids, start, row in segments])
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    for c, saved in zip(caches, after):
        assert_same_codes(saved, c)


def test_tensor_parallel_on_gpus_refuses_fp8_before_starting_its_ranks(monkeypatch):
    """With GPUs in the map, an fp8 cache is refused in one line before any rank process starts (each rank would
    refuse it on its own GPU)."""
    from talis_cli import tensor_parallel
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.errors import UsageError

    monkeypatch.setattr("talis_cli.placement._cuda_count", lambda: 2)
    monkeypatch.setattr(tensor_parallel, "load_engine", lambda *a, **k: pytest.fail("the ranks were started"))
    with pytest.raises(UsageError, match=r"^--kv-cache fp8 is not yet verified on GPUs \(cuda:0\)"):
        Engine.load(LoadSettings(kv_cache="fp8", tensor_parallel=2, device_map="auto"))
