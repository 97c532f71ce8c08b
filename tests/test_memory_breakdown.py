"""The memory breakdown of a bench row (talis_cli.memory_breakdown) against the tensors a tiny random model built
by `bench.random_model` really holds, and its 65B figures against the shapes written out by hand."""
import pytest
import torch

from quant_kernels.quant_linear import QuantLinear
from talis_cli import bench, memory_breakdown
from talis_cli.config import ModelArgs


def tiny_args() -> ModelArgs:
    return ModelArgs(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                     intermediate_size=192, rope_theta=10000.0, max_position_embeddings=512, bos_token_id=None,
                     eos_token_ids=[])


def held_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds: parameters, buffers (the KV cache's too) and the Triton
    backend's prepared weights."""
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, QuantLinear):
            state = m.backend_state
            tensors += [state.qweight, state.scale_zero] + ([state.perm] if state.perm is not None else [])
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("kv_cache,act_order,bits", [("int8", False, 4), ("fp16", True, 4), ("int8", True, 3)])
def test_static_parts_are_what_a_built_model_holds(kv_cache, act_order, bits):
    """Built on the CPU (Triton's interpreter prepares the kernel layout): every byte held is in the breakdown and
    nothing more, so a second copy of a weight (a GPTQ tensor kept after release, a dense copy) fails this. The
    split-K workspace and rotary tables exist only on a GPU and are left out of the sum."""
    args, ctx = tiny_args(), 96
    torch.manual_seed(0)
    model = bench.random_model(args, "gptq", bits, 32, act_order, torch.device("cpu"))
    model.kv_cache_kind = kv_cache
    model.setup_cache(1, ctx)
    breakdown = memory_breakdown.parts(args, bits, 32, ctx, kv_cache, prompt=16, act_order=act_order)
    gpu_only = sum(p.nbytes for p in breakdown if p.name.startswith(("split-K", "rotary")))
    assert held_bytes(model) == memory_breakdown.static_bytes(breakdown) - gpu_only
    before = memory_breakdown.parts(args, bits, 32, ctx, kv_cache, prompt=16, act_order=act_order, before=True)
    assert memory_breakdown.static_bytes(before) - memory_breakdown.static_bytes(breakdown) == 4 * 2 * (
        3 * 128 + 192)  # g_idx, int32 per input row of qkv, o, gate_up, down in 2 layers: no longer held


def test_65b_int8_cache_figures():
    """LLaMA-65B, 4-bit g128, int8 cache of 2048 slots: the products written out by hand."""
    args = bench.shape_args("65B", 2048)
    by_name = {p.name: p.nbytes for p in memory_breakdown.parts(args, 4, 128, 2048, "int8")}
    codes = sum(v for k, v in by_name.items() if k.startswith("4-bit codes"))
    assert codes == 80 * (8192 * 24576 + 8192 * 8192 + 8192 * 44032 + 22016 * 8192) // 2 == 32_380_026_880
    assert by_name["scale/zero words (4 B per group and column)"] == 80 * 4 * (
        64 * 24576 + 64 * 8192 + 64 * 44032 + 172 * 8192)
    assert by_name["KV cache codes (int8, 1 x 2048 slots)"] == 80 * 2 * 64 * 2048 * 128
    assert by_name["KV cache scales (fp32 per head vector)"] == 80 * 2 * 64 * 2048 * 4
    assert by_name["split-K workspace (fp32, 128 rows x widest layer)"] == 4 * 128 * 44032 + 4 * 8 * 1376
    static = memory_breakdown.static_bytes(memory_breakdown.parts(args, 4, 128, 2048, "int8"))
    assert 38.0e9 < static < 38.3e9  # over the 38 GB (10^9) target before anything runs
