"""The decode-step Triton ops against the eager model's own torch code, on fresh random inputs.

Outputs are poisoned with NaN first, so an element a kernel forgets to write fails the comparison. Without a GPU
the kernels run under TRITON_INTERPRET=1 at small shapes (fp16 and fp32 only).
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are defined

from quant_kernels import triton_ops  # noqa: E402
from talis_cli.model import RMSNorm, apply_rotary  # noqa: E402

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


def rotary_tables(max_seq_len: int, hd: int, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(max_seq_len).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2)])
def test_rotary_cache_write_matches_eager(dtype, n_heads, n_kv_heads):
    B, hd, S, slot = 2, 32, 40, 17
    gen = torch.Generator().manual_seed(n_heads * 10 + n_kv_heads)
    qkv = torch.randn(B, (n_heads + 2 * n_kv_heads) * hd, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    cos, sin = rotary_tables(S, hd, dtype)
    pad_lens = torch.tensor([0, 5], device=DEVICE)
    k_cache, v_cache = poisoned((B + 1, n_kv_heads, S, hd), dtype), poisoned((B + 1, n_kv_heads, S, hd), dtype)
    slot_t = torch.tensor([slot], device=DEVICE)
    q_rot = triton_ops.rotary_cache_write(q, k, v, cos, sin, slot_t, pad_lens, k_cache, v_cache, n_heads,
                                          n_kv_heads, q_out=poisoned((B, n_heads, hd), dtype))
    positions = (slot - pad_lens).clamp(min=0)
    c, s = cos[positions][:, None, None], sin[positions][:, None, None]  # [B, 1, 1, hd]
    expected_q = apply_rotary(q.view(B, n_heads, 1, hd), c, s)[:, :, 0]
    expected_k = apply_rotary(k.view(B, n_kv_heads, 1, hd), c, s)[:, :, 0]
    torch.testing.assert_close(q_rot, expected_q, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(k_cache[:B, :, slot], expected_k, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v_cache[:B, :, slot], v.view(B, n_kv_heads, hd))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slot] = False
    assert k_cache[:, :, untouched].isnan().all() and v_cache[B].isnan().all()  # nothing else written


def reference_attention(q, k_cache, v_cache, slot, pad_lens):
    """The eager model's SDPA over cache slots [pad, slot] of each row; q [B, heads, hd] -> [B, heads*hd]."""
    B, n_heads, hd = q.shape
    keys = torch.arange(slot + 1, device=q.device)
    mask = (keys[None, :] >= pad_lens[:, None])[:, None, None]  # [B, 1, 1, S]
    y = F.scaled_dot_product_attention(q[:, :, None].float(), k_cache[:B, :, : slot + 1].float(),
                                       v_cache[:B, :, : slot + 1].float(), attn_mask=mask,
                                       enable_gqa=k_cache.shape[1] != n_heads)
    return y.reshape(B, n_heads * hd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv_heads,slot,capacity", [(4, 4, 0, 64), (4, 2, 150, 256), (2, 1, 63, 64)])
def test_decode_attention_matches_sdpa(dtype, n_heads, n_kv_heads, slot, capacity):
    B, hd, S = 2, 32, 300
    gen = torch.Generator().manual_seed(slot + capacity)
    q = torch.randn(B, n_heads, hd, generator=gen).to(DEVICE, dtype)
    k_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(B, n_kv_heads, S, hd, generator=gen).to(DEVICE, dtype)
    k_cache[:, :, slot + 1:] = float("nan")  # slots past the current one are never read
    v_cache[:, :, slot + 1:] = float("nan")
    pad_lens = torch.tensor([0, min(3, slot)], device=DEVICE)
    out = triton_ops.decode_attention(q, k_cache, v_cache, torch.tensor([slot], device=DEVICE), pad_lens, capacity,
                                      n_sms=4, out=poisoned((B, n_heads * hd), dtype))
    assert not out.isnan().any()
    assert rel_err(out, reference_attention(q, k_cache, v_cache, slot, pad_lens)) < 2e-3


@pytest.mark.parametrize("capacity,rows", [(64, 32), (2048, 32), (2048, 1), (300, 8)])
def test_attention_splits_cover_capacity(capacity, rows):
    splits, chunk = triton_ops.attention_splits(capacity, rows, sms=132)
    assert splits & (splits - 1) == 0 and splits * chunk >= capacity and (splits - 1) * chunk < capacity
