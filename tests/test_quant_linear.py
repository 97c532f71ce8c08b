"""QuantLinear and its torch backends against x @ dequantize(...) on fresh random inputs."""

import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.quant_linear import QuantLinear, TorchBackend, register_backend


def random_layer(in_features, out_features, bits, group_size, generator, act_order=False, bias=False,
                 dtype=torch.float32):
    """A QuantLinear over random codes, zeros and scales (scales ~ 1/sqrt(in) keeps outputs O(1))."""
    n_groups = gptq_format.num_groups(in_features, group_size)
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
    zeros = torch.randint(0, 2**bits, (n_groups, out_features), generator=generator)
    scales = (torch.rand(n_groups, out_features, generator=generator) + 0.5) / (in_features ** 0.5 * 2**bits)
    g_idx = gptq_format.default_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return QuantLinear.from_quantized(
        gptq_format.pack_rows(q, bits), gptq_format.pack_cols(zeros, bits), scales.to(dtype), g_idx, bits,
        group_size, zero_offset=1,
        bias=torch.randn(out_features, generator=generator).to(dtype) if bias else None)


def reference(layer, x):
    """x @ W + b in float32 from the layer's tensors."""
    weight = gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales.float(), layer.g_idx, layer.bits, 1)
    y = x.float() @ weight
    return y + layer.bias.float() if layer.bias is not None else y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,in_features,out_features", [(32, 96, 40), (128, 256, 64), (-1, 160, 33)])
@pytest.mark.parametrize("rows", [1, 7])
def test_torch_backend_matches_dequantize_then_matmul(bits, group_size, in_features, out_features, rows):
    generator = torch.Generator().manual_seed(bits * 100 + rows + in_features)
    layer = random_layer(in_features, out_features, bits, group_size, generator, act_order=rows == 7,
                         bias=rows == 1)
    x = torch.randn(rows, in_features, generator=generator)
    y = layer(x)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-5, atol=1e-5)


def test_blocked_dequantization_matches_one_block(monkeypatch):
    """Force many small row blocks (with act-order groups) and compare with the whole-matrix reference."""
    generator = torch.Generator().manual_seed(11)
    layer = random_layer(320, 48, 3, 64, generator, act_order=True)
    monkeypatch.setattr(TorchBackend, "block_elements", 48 * 32)  # 32 rows per block: ten blocks
    layer.set_backend("torch")
    assert layer._state["block_rows"] == 32
    x = torch.randn(2, 5, 320, generator=generator)  # leading dims are flattened and restored
    y = layer(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-5, atol=1e-5)


def test_dense_backend_and_dequantized_weight_agree_with_nn_linear_orientation():
    generator = torch.Generator().manual_seed(5)
    layer = random_layer(128, 24, 4, 32, generator, bias=True)
    x = torch.randn(3, 128, generator=generator)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.set_backend("torch_dense")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_loading_a_state_dict_refreshes_prepared_state():
    generator = torch.Generator().manual_seed(9)
    first, second = (random_layer(64, 16, 4, 32, generator) for _ in range(2))
    x = torch.randn(2, 64, generator=generator)
    first(x)  # prepares state from the first tensors
    first.load_state_dict(second.state_dict())
    torch.testing.assert_close(first(x), reference(second, x), rtol=1e-5, atol=1e-5)


def test_meta_layer_filled_by_assignment_runs():
    generator = torch.Generator().manual_seed(13)
    source = random_layer(96, 32, 3, 32, generator)
    layer = QuantLinear(96, 32, 3, 32, dtype=torch.float32, device="meta")
    layer.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(4, 96, generator=generator)
    torch.testing.assert_close(layer(x), reference(source, x), rtol=1e-5, atol=1e-5)


def test_registered_backend_is_used_by_set_backend():
    calls = []

    class Recording(TorchBackend):
        def forward(self, layer, state, x2d):
            calls.append(x2d.shape)
            return super().forward(layer, state, x2d)

    register_backend("recording-test", Recording)
    generator = torch.Generator().manual_seed(17)
    layer = random_layer(64, 16, 4, 32, generator)
    layer.set_backend("recording-test")
    x = torch.randn(3, 2, 64, generator=generator)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([6, 64])]
    with pytest.raises(ValueError, match="unknown QuantLinear backend"):
        layer.set_backend("no-such-backend")


def test_from_quantized_checks_shapes():
    generator = torch.Generator().manual_seed(19)
    layer = random_layer(64, 16, 4, 32, generator)
    with pytest.raises(ValueError, match="qweight has shape"):
        QuantLinear.from_quantized(layer.qweight[:-1], layer.qzeros, layer.scales, layer.g_idx, 4, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [3, 4])
def test_torch_backend_fp16_on_cuda(bits):
    generator = torch.Generator().manual_seed(bits)
    layer = random_layer(512, 256, bits, 128, generator, act_order=True, dtype=torch.float16).cuda()
    x = torch.randn(5, 512, generator=generator).cuda().half()
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), reference(layer, x), rtol=2e-2, atol=2e-2)
