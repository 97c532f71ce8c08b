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


def test_memory_peak_script_finds_the_peak_and_its_sites(tmp_path, capsys):
    """scripts/memory_peak.py on a made-up snapshot in torch's layout: the peak is where the 3 MB and 2 MB blocks
    were live together (before the 3 MB one was freed), grouped by their innermost frame in talis' code."""
    import importlib.util
    import pickle
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "memory_peak.py"
    spec = importlib.util.spec_from_file_location("memory_peak", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/repo/talis_cli/model.py", "line": 42, "name": "forward"}]
    trace = [dict(action="alloc", addr=1, size=3_000_000, frames=ours),
             dict(action="free_requested", addr=99, size=5),  # allocated before the trace: skipped
             dict(action="alloc", addr=2, size=2_000_000, frames=[{"filename": "/repo/quant_kernels/a.py",
                                                                    "line": 7, "name": "prepare"}]),
             dict(action="free_requested", addr=1, size=3_000_000),
             dict(action="alloc", addr=3, size=1_000_000, frames=ours)]
    top, live = script.peak(trace)
    assert top == 5_000_000 and sorted(live) == [1, 2]
    snapshot = tmp_path / "s.pickle"
    snapshot.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    assert script.main([str(snapshot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cuda:0: peak 5,000,000 bytes = 0.005 GB")
    assert out[1].split() == ["3,000,000", "0.003", "GB", "1x", "talis_cli/model.py:42", "forward"]
    assert out[2].split()[-2:] == ["quant_kernels/a.py:7", "prepare"]
    assert script.main([str(tmp_path / "missing.pickle")]) == 1


def test_gpu_check_summary_states_the_expected_memory_of_kv65b():
    """scripts/gpu_check.py's kv65b spec: the summary line sets the measured peak beside the breakdown's figures."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    kwargs = script.parse_spec("kv65b")
    report = dict(shape=kwargs["shape"].upper(), ctx=kwargs["ctx"], bits=4, group_size=128,
                  kv_cache=kwargs["kv_cache"], prompt=kwargs["prompt"], act_order=False)
    breakdown = memory_breakdown.parts(bench.shape_args("65B", 2048), 4, 128, 2048, "int8", 128)
    assert script.expected_memory(report) == (
        f"memory_breakdown: static {memory_breakdown.static_bytes(breakdown) / 1e9:.2f} GB, expected peak "
        f"{memory_breakdown.expected_peak(breakdown) / 1e9:.2f} GB") == (
        "memory_breakdown: static 38.25 GB, expected peak 38.45 GB")
    assert script.expected_memory(dict(model="x")) == "no breakdown for --model runs"


@pytest.mark.parametrize("shape,kv_cache", [("65B", "int8"), ("7B", "fp16"), ("70B", "fp16")])
def test_the_device_plan_counts_at_least_what_the_kernels_hold(shape, kv_cache):
    """The planner's footprint (from checkpoint shapes) is not below the static state of the GPU layout, so a plan
    that fits does not run out of memory for the scale/zero words (it undercounted them by 1.5 bytes per group
    and column before), and overcounts by little (the zero points and g_idx the Triton backend frees)."""
    from talis_cli.memory_plan import footprint
    from talis_cli.model_info import kv_cache_bytes

    args = bench.shape_args(shape, 2048)
    planned = footprint(bench.gptq_tensor_shapes(args, 4, 128), args.n_layers,
                        kv_cache_bytes(args, 2048, kind=kv_cache) // args.n_layers, 2).total
    held = [p for p in memory_breakdown.parts(args, 4, 128, 2048, kv_cache) if p.held == "static"]
    weights_and_cache = sum(p.nbytes for p in held if "workspace" not in p.name)
    assert weights_and_cache <= planned < weights_and_cache * 1.01
