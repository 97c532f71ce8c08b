"""The GPTQ format: a simple packer written from the documented layout must dequantize exactly."""

import pytest
import torch

from quant_kernels import gptq_format


def pack_by_layout(values: list[list[int]], bits: int) -> torch.Tensor:
    """Test-local packer for lists of column streams (formats.md): value k of a stream sits at stream bits
    [bits*k, bits*k + bits), least significant first; stream bit b is bit b % 32 of word b // 32.
    Returns int32 [words, len(values)], one column per stream."""
    n_words = -(-len(values[0]) * bits // 32)
    columns = []
    for stream in values:
        words = [0] * n_words
        for k, value in enumerate(stream):
            for b in range(bits):
                bit = bits * k + b
                if (value >> b) & 1:
                    words[bit // 32] |= 1 << (bit % 32)
        columns.append([w - 2**32 if w >= 2**31 else w for w in words])
    return torch.tensor(columns, dtype=torch.int32).t()


def make_checkpoint(in_features, out_features, bits, group_size, act_order, zero_offset, generator):
    """Known integer weights/zeros and scales, packed by the test-local packer, and the floats they mean."""
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
    stored_zeros = torch.randint(0, 2**bits, (n_groups, out_features), generator=generator)
    scales = torch.rand(n_groups, out_features, generator=generator) + 0.01
    rows = torch.arange(in_features)
    g_idx = torch.zeros_like(rows) if group_size == -1 else rows // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    qweight = pack_by_layout(q.t().tolist(), bits)  # each output column is a stream along input rows
    qzeros = pack_by_layout(stored_zeros.tolist(), bits).t()  # each group row is a stream along output columns
    zeros = stored_zeros + zero_offset
    expected = torch.stack([scales[g_idx[i], :] * (q[i] - zeros[g_idx[i]]).float() for i in range(in_features)])
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx.to(torch.int32)), q, stored_zeros, expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_reproduces_the_weights_packed_by_the_documented_layout(bits, group_size, act_order):
    generator = torch.Generator().manual_seed(bits * 1000 + group_size + act_order)
    in_features, out_features = 256, 64
    tensors, q, stored_zeros, expected = make_checkpoint(in_features, out_features, bits, group_size, act_order,
                                                         zero_offset=1, generator=generator)
    assert tensors["qweight"].shape == (in_features * bits // 32, out_features)
    assert tensors["qzeros"].shape == (tensors["scales"].shape[0], out_features * bits // 32)
    weights = gptq_format.dequantize(**tensors, bits=bits, zero_offset=1)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, expected)
    # and our packer produces the very same words
    assert torch.equal(gptq_format.pack_rows(q, bits), tensors["qweight"])
    assert torch.equal(gptq_format.pack_cols(stored_zeros, bits), tensors["qzeros"])


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_zero_offset_follows_the_checkpoint_format(checkpoint_format):
    generator = torch.Generator().manual_seed(7)
    offset = gptq_format.zero_offset_for(checkpoint_format)
    tensors, _, _, expected = make_checkpoint(64, 32, 4, 32, False, zero_offset=offset, generator=generator)
    assert torch.equal(gptq_format.dequantize(**tensors, bits=4, zero_offset=offset), expected)


def test_symmetric_v1_zeros_pack_to_sevens():
    zeros_minus_one = torch.full((2, 16), 7)
    assert (gptq_format.pack_cols(zeros_minus_one, 4) == 0x77777777).all()


def test_dequantize_in_fp16_rounds_the_exact_product_once():
    generator = torch.Generator().manual_seed(3)
    tensors, q, stored_zeros, _ = make_checkpoint(128, 32, 4, 32, True, zero_offset=1, generator=generator)
    tensors["scales"] = tensors["scales"].half()
    weights = gptq_format.dequantize(**tensors, bits=4, zero_offset=1)
    assert weights.dtype == torch.float16
    groups = tensors["g_idx"].long()
    exact = tensors["scales"].float()[groups] * (q - stored_zeros[groups] - 1).float()  # exact in float32
    assert torch.equal(weights, exact.half())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 31, 32, 33, 96, 4096 + 160])  # the last spans two internal chunks
def test_pack_unpack_round_trip(bits, length):
    generator = torch.Generator().manual_seed(bits + length)
    q = torch.randint(0, 2**bits, (length, 5), generator=generator)
    rows = gptq_format.pack_rows(q, bits)
    assert rows.shape == (-(-length * bits // 32), 5) and rows.dtype == torch.int32
    assert torch.equal(gptq_format.unpack_rows(rows, bits, length), q.to(torch.int32))
    cols = gptq_format.pack_cols(q.t(), bits)
    assert torch.equal(gptq_format.unpack_cols(cols, bits, length), q.t().to(torch.int32))


def test_pack_rejects_values_out_of_range():
    with pytest.raises(ValueError, match="lie in"):
        gptq_format.pack_rows(torch.full((32, 2), -1), 4)
    with pytest.raises(ValueError, match="lie in"):
        gptq_format.pack_rows(torch.full((32, 2), 16), 4)
