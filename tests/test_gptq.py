"""GPTQ and RTN on one weight matrix: output error, code ranges, act-order consistency."""

import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.gptq import GPTQ, rtn_quantize
from quant_kernels.quant_linear import QuantLinear


def correlated_problem(seed, out_features=64, in_features=256, samples=1024):
    """Random W [out, in] and calibration X [samples, in] with correlated, unevenly scaled features."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features ** 0.5
    x = torch.randn(samples, in_features, generator=generator) @ mixing
    x = x * (torch.rand(in_features, generator=generator) * 3 + 0.1)
    return weight, x


def output_error(x, weight, packed):
    return (x @ weight.t() - x @ packed.dequantize().t()).norm() / (x @ weight.t()).norm()


def run_gptq(weight, x, **settings):
    gptq = GPTQ(weight)
    for chunk in x.split(300):  # several batches: the running Hessian average must not depend on batching
        gptq.add_batch(chunk)
    return gptq.quantize(**settings)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128), (3, -1), (4, 32), (8, 64)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_output_error_is_below_rtn(bits, group_size, act_order, sym):
    weight, x = correlated_problem(seed=bits * 10 + act_order + 2 * sym)
    gptq_error = output_error(x, weight, run_gptq(weight, x, bits=bits, group_size=group_size, sym=sym,
                                                  act_order=act_order))
    rtn_error = output_error(x, weight, rtn_quantize(weight, bits, group_size, sym))
    assert gptq_error < 0.9 * rtn_error


def test_hessian_is_twice_the_mean_outer_product():
    weight, x = correlated_problem(seed=1, samples=333)
    gptq = GPTQ(weight)
    for chunk in x.split(100):
        gptq.add_batch(chunk.reshape(-1, 4, x.shape[1]) if chunk.shape[0] % 4 == 0 else chunk)
    torch.testing.assert_close(gptq.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("method", ["gptq", "gptq-act-order", "gptq-static-groups", "rtn"])
def test_codes_in_range_and_layout_consistent(bits, group_size, method):
    weight, x = correlated_problem(seed=bits + group_size, out_features=32, in_features=192, samples=256)
    if method == "rtn":
        packed = rtn_quantize(weight, bits, group_size, sym=False)
    else:
        packed = run_gptq(weight, x, bits=bits, group_size=group_size, sym=False,
                          act_order=method != "gptq", static_groups=method == "gptq-static-groups")
    n_groups = gptq_format.num_groups(192, group_size)
    assert packed.qweight.shape == (192 * bits // 32, 32) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (n_groups, 32 * bits // 32) and packed.scales.shape == (n_groups, 32)
    assert packed.scales.dtype == torch.float16 and (packed.scales > 0).all()
    codes = gptq_format.unpack_rows(packed.qweight, bits, 192)
    assert codes.min() >= 0 and codes.max() < 2**bits
    stored_zeros = gptq_format.unpack_cols(packed.qzeros, bits, 32)
    # v1 stores zero - 1 and the true zero lies in [1, maxq], so no -1 (all ones) is ever stored
    assert stored_zeros.max() <= 2**bits - 2
    # every group is used, and g_idx is a valid group for each row
    assert torch.equal(torch.unique(packed.g_idx.long()), torch.arange(n_groups))
    if method in ("gptq", "rtn"):
        assert torch.equal(packed.g_idx, gptq_format.default_g_idx(192, group_size))
    # act-order permutes rows between groups but keeps each group's size (192 rows: the last g128 group is half)
    sizes = torch.bincount(packed.g_idx.long(), minlength=n_groups)
    assert torch.equal(sizes, torch.bincount(gptq_format.default_g_idx(192, group_size).long()))


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_quantizes_in_decreasing_hessian_order_and_dequantizes_via_g_idx(static_groups):
    weight, x = correlated_problem(seed=23, out_features=48, in_features=256, samples=512)
    packed = run_gptq(weight, x, bits=4, group_size=32, sym=True, act_order=True, static_groups=static_groups)
    hessian_order = torch.argsort(torch.diag(2 * x.t() @ x), descending=True)
    if static_groups:  # groups are the original consecutive rows
        assert torch.equal(packed.g_idx, gptq_format.default_g_idx(256, 32))
    else:  # groups are consecutive runs in quantization order
        assert torch.equal(packed.g_idx[hessian_order].long(), torch.arange(256) // 32)
    layer = QuantLinear.from_quantized(packed.qweight, packed.qzeros, packed.scales.float(), packed.g_idx, 4, 32)
    probe = torch.randn(5, 256)
    torch.testing.assert_close(layer(probe), probe @ packed.dequantize().t(), rtol=1e-5, atol=1e-5)
    # symmetric v1 4-bit: every stored zero is 7
    assert (packed.qzeros == 0x77777777).all()
    # and the quantized weight is close to the original one
    assert (packed.dequantize() - weight).abs().max() < 0.5 * weight.abs().max()


def test_dead_inputs_get_zero_weight():
    weight, x = correlated_problem(seed=29, in_features=128)
    x[:, 5] = 0
    packed = run_gptq(weight, x, bits=4, group_size=64, sym=True, act_order=False)
    assert (packed.dequantize()[:, 5] == 0).all()


def test_quantize_without_calibration_is_refused():
    with pytest.raises(ValueError, match="add_batch"):
        GPTQ(torch.randn(8, 32)).quantize(bits=4, group_size=32)
