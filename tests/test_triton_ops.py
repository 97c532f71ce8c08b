"""The decode-step Triton ops against the eager model's own torch code, on fresh random inputs.

Outputs are poisoned with NaN first, so an element a kernel forgets to write fails the comparison. Without a GPU
the kernels run under TRITON_INTERPRET=1 at small shapes (fp16 and fp32 only).
"""
import pytest
import torch
import triton
import torch.nn.functional as F

from quant_kernels import triton_ops
from talis_cli.model import RMSNorm, apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 96), (3, 256)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_module(dtype, rows, dim, with_residual):
    gen = torch.Generator().manual_seed(rows * dim + with_residual)
    norm = RMSNorm(dim, 1e-5).to(DEVICE, dtype)
    norm.weight.data = (torch.rand(dim, generator=gen) + 0.5).to(DEVICE, dtype)
    x = torch.randn(rows, dim, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(rows, dim, generator=gen).to(DEVICE, dtype) * 3
    expected_sum = residual + x
    expected = norm(expected_sum if with_residual else x)
    res = residual.clone() if with_residual else None
    out = triton_ops.rms_norm(x, norm.weight, 1e-5, res, out=poisoned((rows, dim), dtype))
    assert not out.isnan().any()
    assert rel_err(out, expected) < 1e-3
    if with_residual:
        torch.testing.assert_close(res, expected_sum)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gen = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(2, 2 * 1500, generator=gen) * 3).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, as a fused projection gives them
    out = triton_ops.silu_mul(gate, up, out=poisoned((2, 1500), dtype))
    assert not out.isnan().any()
    assert rel_err(out, F.silu(gate) * up) < 1e-3


@pytest.mark.parametrize("with_residual", [False, True])
def test_gathered_outputs_are_the_plain_outputs_permuted_exactly(with_residual):
    """rms_norm / silu_mul with `gather` write feature gather[j] into column j, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    dim = 200
    gather = torch.randperm(dim, generator=gen).to(torch.int32).to(DEVICE)
    x = torch.randn(2, dim, generator=gen).half().to(DEVICE)
    weight = (torch.rand(dim, generator=gen) + 0.5).half().to(DEVICE)
    residual = torch.randn(2, dim, generator=gen).half().to(DEVICE)
    res_plain, res_gathered = (residual.clone(), residual.clone()) if with_residual else (None, None)
    plain = triton_ops.rms_norm(x, weight, 1e-5, res_plain)
    gathered = triton_ops.rms_norm(x, weight, 1e-5, res_gathered, out=poisoned((2, dim), torch.float16),
                                   gather=gather)
    assert torch.equal(gathered, plain[:, gather.long()])
    if with_residual:
        assert torch.equal(res_gathered, res_plain)  # the residual stream stays in feature order
    gate, up = x * 3, residual
    act = triton_ops.silu_mul(gate, up, out=poisoned((2, dim), torch.float16), gather=gather)
    assert torch.equal(act, triton_ops.silu_mul(gate, up)[:, gather.long()])


def rotary_tables(max_seq_len: int, hd: int, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(max_seq_len).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def reference_step(q, k, v, cos, sin, slot, pad_lens, k_cache, v_cache, window=None):
    """The eager model's decode attention: rotary, cache write at `slot`, SDPA over slots [pad, slot] of each row
    (the last `window` of them only, with a window).

    q [B, heads*hd], k and v [B, kv_heads*hd]; the caches are updated in place; returns [B, heads*hd] (fp32)."""
    B, hd = q.shape[0], cos.shape[1]
    n_heads, n_kv_heads = q.shape[1] // hd, k_cache.shape[1]
    positions = (slot - pad_lens).clamp(min=0)
    c, s = cos[positions][:, None, None], sin[positions][:, None, None]  # [B, 1, 1, hd]
    q = apply_rotary(q.view(B, n_heads, 1, hd), c, s)
    k_cache[:B, :, slot] = apply_rotary(k.view(B, n_kv_heads, 1, hd), c, s)[:, :, 0]
    v_cache[:B, :, slot] = v.view(B, n_kv_heads, hd)
    keys = torch.arange(slot + 1, device=q.device)
    mask = (keys[None, :] >= pad_lens[:, None])[:, None, None]  # [B, 1, 1, S]
    if window is not None:
        mask = mask & (keys > slot - window)
    y = F.scaled_dot_product_attention(q.float(), k_cache[:B, :, : slot + 1].float(),
                                       v_cache[:B, :, : slot + 1].float(), attn_mask=mask,
                                       enable_gqa=n_kv_heads != n_heads)
    return y.reshape(B, n_heads * hd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv_heads,slot,capacity", [(4, 4, 0, 64), (4, 2, 150, 256), (2, 1, 63, 64),
                                                              (4, 2, 17, 40)])
def test_decode_attention_matches_eager_step(dtype, n_heads, n_kv_heads, slot, capacity):
    B, hd, S = 2, 32, 300
    gen = torch.Generator().manual_seed(slot + capacity + n_kv_heads)
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)  # strided views
    cos, sin = rotary_tables(S, hd, dtype)
    k_cache = torch.randn(B + 1, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(B + 1, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    k_cache[:, :, slot:] = float("nan")  # the current slot and later ones are never read from the cache
    v_cache[:, :, slot:] = float("nan")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pad_lens = torch.tensor([0, min(3, slot)], device=DEVICE)
    slot_t = torch.tensor([slot], device=DEVICE)
    expected = reference_step(q, k, v, cos, sin, slot, pad_lens, k_ref, v_ref)
    for _ in range(2):  # a second launch finds the tickets reset
        out = triton_ops.decode_attention(q, k, v, cos, sin, slot_t, pad_lens, k_cache, v_cache, capacity,
                                          n_sms=4, out=poisoned((B, n_heads * hd), dtype))
        assert not out.isnan().any()
        assert rel_err(out, expected) < 2e-3
    torch.testing.assert_close(k_cache[:B, :, slot], k_ref[:B, :, slot], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v_cache[:B, :, slot], v_ref[:B, :, slot])
    assert k_cache[:, :, slot + 1:].isnan().all() and k_cache[B].isnan()[:, slot].all()  # nothing else written
    # an act-order consumer's order: feature f lands in column scatter[f], the values unchanged
    scatter = torch.randperm(n_heads * hd, generator=gen).to(DEVICE, torch.int32)
    k_cache[:B, :, slot] = float("nan")
    scattered = triton_ops.decode_attention(q, k, v, cos, sin, slot_t, pad_lens, k_cache, v_cache, capacity,
                                            n_sms=4, out=poisoned((B, n_heads * hd), dtype), scatter=scatter)
    assert torch.equal(scattered[:, scatter.long()], out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,capacity", [(None, 128), (20, 20), (None, 256)])
def test_decode_attention_rows_at_their_own_slots_and_cache_rows(dtype, window, capacity):
    """Continuous batching: row b at its own slot in cache row rows[b] gives what it gives alone (the plain step
    on that cache row), writes only its own slot of its own row, and a spare lane (rows[3] = the spare row)
    writes nowhere else."""
    n_heads, n_kv_heads, hd, S = 4, 2, 32, 200
    slots, rows = [5, 70, 0, 0], [3, 0, 2, 4]  # the last lane is spare: cache row 4 belongs to no request
    B = len(slots)
    gen = torch.Generator().manual_seed(capacity + (window or 0))
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    cos, sin = rotary_tables(S, hd, dtype)
    k_cache = torch.randn(5, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(5, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    for slot, row in zip(slots, rows):  # each row's own slot and later ones are never read
        k_cache[row, :, slot:] = float("nan")
        v_cache[row, :, slot:] = float("nan")
    k_cache[1], v_cache[1] = float("nan"), float("nan")  # a row no lane uses: never read nor written
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    expected = torch.cat([reference_step(q[b : b + 1], k[b : b + 1], v[b : b + 1], cos, sin, slots[b], zero,
                                         k_ref[rows[b] : rows[b] + 1], v_ref[rows[b] : rows[b] + 1], window)
                          for b in range(B)])
    for _ in range(2):  # a second launch finds the tickets reset
        out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor(slots, device=DEVICE),
                                          torch.zeros(B, dtype=torch.long, device=DEVICE), k_cache, v_cache,
                                          capacity, n_sms=4, out=poisoned((B, n_heads * hd), dtype), window=window,
                                          rows=torch.tensor(rows, device=DEVICE))
        assert rel_err(out[:3], expected[:3]) < 2e-3
    for slot, row in zip(slots, rows):
        torch.testing.assert_close(k_cache[row, :, slot], k_ref[row, :, slot], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(v_cache[row, :, slot], v_ref[row, :, slot])
        assert k_cache[row, :, slot + 1:].isnan().all()
    assert k_cache[1].isnan().all() and v_cache[1].isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8, 16, 32])
def test_decode_attention_at_serving_batches_on_the_gpu(rows):
    """7B heads at a server's batch sizes, each row at its own slot of 256, with the launch the GPU's SM count
    gives (1-8 rows: 128-slot blocks; 16 and 32 rows: 32-slot blocks, three deep): each row as its plain step."""
    n_heads, hd, capacity = 32, 128, 256
    gen = torch.Generator().manual_seed(rows)
    q, k, v = (torch.randn(rows, n_heads * hd, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    cos, sin = rotary_tables(capacity, hd, torch.float16)
    k_cache = torch.randn(rows, n_heads, capacity, hd, generator=gen).to(DEVICE, torch.float16)
    v_cache = torch.randn(rows, n_heads, capacity, hd, generator=gen).to(DEVICE, torch.float16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.randint(capacity // 2, capacity, (rows,), generator=gen).tolist()
    zero = torch.zeros(1, dtype=torch.long, device=DEVICE)
    expected = torch.cat([reference_step(q[b : b + 1], k[b : b + 1], v[b : b + 1], cos, sin, slots[b], zero,
                                         k_ref[b : b + 1], v_ref[b : b + 1]) for b in range(rows)])
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor(slots, device=DEVICE),
                                      torch.zeros(rows, dtype=torch.long, device=DEVICE), k_cache, v_cache, capacity,
                                      n_sms=sms, rows=torch.arange(rows, device=DEVICE))
    assert rel_err(out, expected) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,block,capacity,window", [(2, 32, 256, None), (8, 16, 256, None), (2, 32, 64, 50)])
def test_decode_attention_merges_splits(dtype, splits, block, capacity, window):
    """Launches split along the cache, as a GPU's many SMs get them (on 4 SMs the default is one split): the
    splits' partials merged, a split that sees only padding (row 1's first 130 slots) weighing nothing, a sliding
    window's splits starting at its first slot."""
    B, hd, n_heads, n_kv_heads, slot, S = 2, 32, 4, 2, 150, 300
    gen = torch.Generator().manual_seed(splits + block)
    q, k, v = (torch.randn(B, n * hd, generator=gen).to(DEVICE, dtype) for n in (n_heads, n_kv_heads, n_kv_heads))
    cos, sin = rotary_tables(S, hd, dtype)
    k_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pad_lens = torch.tensor([0, 130], device=DEVICE)
    expected = reference_step(q, k, v, cos, sin, slot, pad_lens, k_ref, v_ref, window=window)
    launch = triton_ops.AttentionLaunch(splits, triton.cdiv(capacity, splits), block, stages=2)
    for _ in range(2):  # the tickets are left zero for the next launch
        out = triton_ops.decode_attention(q, k, v, cos, sin, torch.tensor([slot], device=DEVICE), pad_lens,
                                          k_cache, v_cache, capacity, window=window, launch=launch)
        assert not out.isnan().any() and rel_err(out, expected) < 2e-3


def test_attention_launch_shapes_by_programs_per_sm():
    """Long blocks two deep for up to 3 programs per SM, short ones three deep beyond; arguments given win."""
    few, many = triton_ops.attention_launch(256, 8 * 32, 132), triton_ops.attention_launch(256, 16 * 32, 132)
    assert (few.block, few.stages, few.splits) == (128, 2, 1)
    assert (many.block, many.stages, many.splits) == (32, 3, 1)
    one_row = triton_ops.attention_launch(2048, 32, 132)
    assert one_row.splits == 8 and one_row.chunk == 256  # doubled while under one program per SM (128 < 132)
    forced = triton_ops.attention_launch(2048, 32, 132, block=16, stages=4, per_sm=2, min_chunk=256)
    assert (forced.block, forced.stages, forced.splits, forced.chunk) == (16, 4, 8, 256)  # the chunk floor binds
    assert triton_ops.attention_launch(2048, 32, 132, per_sm=2).splits == 16


@pytest.mark.parametrize("capacity,rows", [(64, 32), (2048, 32), (2048, 1), (300, 8)])
def test_attention_splits_cover_capacity(capacity, rows):
    launch = triton_ops.attention_launch(capacity, rows, sms=132)
    splits, chunk = launch.splits, launch.chunk
    assert splits & (splits - 1) == 0 and splits * chunk >= capacity and (splits - 1) * chunk < capacity
