"""Device planning on fake capacities: who goes where, and a clear message when a model does not fit."""

import pytest
import torch

from talis_cli.config import ModelArgs
from talis_cli.engine import Engine, LoadSettings
from talis_cli.errors import TalisError, UsageError
from talis_cli.memory_plan import GiB, footprint, parse_max_memory, plan_by_capacity
from talis_cli.model_info import kv_cache_bytes
from talis_cli.placement import DevicePlan, plan_devices
from tests.tiny_models import hf_model, save_gptq

LLAMA_65B = ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, head_dim=128,
                      intermediate_size=22016)


def gptq_shapes(args: ModelArgs, bits: int = 4, group: int = 128) -> dict[str, list[int]]:
    """Tensor shapes of an AutoGPTQ checkpoint of this architecture."""
    shapes = {"model.embed_tokens.weight": [args.vocab_size, args.dim], "model.norm.weight": [args.dim],
              "lm_head.weight": [args.vocab_size, args.dim]}
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    linears = {"self_attn.q_proj": (args.dim, q), "self_attn.k_proj": (args.dim, kv), "self_attn.v_proj": (args.dim, kv),
               "self_attn.o_proj": (q, args.dim), "mlp.gate_proj": (args.dim, args.intermediate_size),
               "mlp.up_proj": (args.dim, args.intermediate_size), "mlp.down_proj": (args.intermediate_size, args.dim)}
    for i in range(args.n_layers):
        for name, (k, n) in linears.items():
            p = f"model.layers.{i}.{name}"
            shapes.update({f"{p}.qweight": [k * bits // 32, n], f"{p}.qzeros": [k // group, n * bits // 32],
                           f"{p}.scales": [k // group, n], f"{p}.g_idx": [k]})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = [args.dim]
    return shapes


def footprint_65b(ctx: int):
    return footprint(gptq_shapes(LLAMA_65B), 80, kv_cache_bytes(LLAMA_65B, ctx) // 80, float_bytes=2)


def test_65b_footprint_matches_the_anchor_arithmetic():
    fp = footprint_65b(2048)
    weights = fp.total - kv_cache_bytes(LLAMA_65B, 2048)
    # anchors: 33.64 GB of 4-bit weights + scales/zeros + fp16 embed/head in the checkpoint; the GPU holds the
    # scales as 4-byte scale/zero words (35.45 GB in all), the plan counts the zeros too (35.73)
    assert 35.45e9 < weights < 35.8e9
    assert 40.5e9 < fp.total < 41.2e9  # with the fp16 KV cache of 2048 tokens (anchors: at least 39.5 GB)


def test_65b_splits_over_two_24gib_gpus_at_2048_context():
    plan = plan_by_capacity(footprint_65b(2048), {"cuda:0": 24 * GiB, "cuda:1": 24 * GiB})
    assert plan["model.embed_tokens"] == "cuda:0" and plan["lm_head"] == plan["model.norm"] == "cuda:1"
    layers = [plan[f"model.layers.{i}"] for i in range(80)]
    first_on_1 = layers.index("cuda:1")
    assert 30 < first_on_1 < 50 and layers == ["cuda:0"] * first_on_1 + ["cuda:1"] * (80 - first_on_1)


def test_does_not_fit_says_how_much_is_missing():
    with pytest.raises(TalisError, match=r"does not fit.*GiB is missing"):
        plan_by_capacity(footprint_65b(2048), {"cuda:0": 16 * GiB, "cuda:1": 16 * GiB})
    # whole layers overflow to the CPU when it is offered
    plan = plan_by_capacity(footprint_65b(2048), {"cuda:0": 16 * GiB, "cuda:1": 16 * GiB, "cpu": 64 * GiB})
    assert plan["lm_head"] == "cpu" and plan["model.layers.0"] == "cuda:0"


def test_parse_max_memory():
    assert parse_max_memory("0=22GiB, 1=24GiB,cpu=32GiB") == {"cuda:0": 22 * GiB, "cuda:1": 24 * GiB, "cpu": 32 * GiB}
    assert parse_max_memory("0=1500MiB") == {"cuda:0": 1500 << 20}
    for bad in ("0:22GiB", "gpu=3GiB", "0=lots", ""):
        with pytest.raises(UsageError):
            parse_max_memory(bad)


def test_explicit_map_overflowing_a_cap_fails_before_loading():
    fp = footprint_65b(2048)
    raw = {"layers": {"0-79": "cpu"}}
    with pytest.raises(TalisError, match="cpu would need"):
        plan_devices(raw, 80, "map.json", fp, {"cpu": 8 * GiB})


def test_layer_ranges_on_cpu_run_end_to_end(tmp_path):
    model = hf_model(seed=7, num_hidden_layers=3)
    save_gptq(model, tmp_path, bits=4, group_size=64)
    split = tmp_path / "split.json"
    split.write_text('{"layers": {"0-1": "cpu", "2-2": "cpu"}, "embed_tokens": "cpu", "lm_head": "cpu"}')
    tokens = torch.randint(3, 4096, (1, 10), generator=torch.Generator().manual_seed(0))
    outs = []
    for device_map in ("cpu", str(split)):
        engine = Engine.load(LoadSettings(model_dir=tmp_path, device_map=device_map, backend="torch", max_seq_len=32))
        assert isinstance(engine.plan, DevicePlan)
        engine.model.clear_cache()
        with torch.no_grad():
            outs.append(engine.model(tokens))
    assert torch.equal(outs[0], outs[1])


def test_auto_plan_of_a_real_folder_uses_the_footprint(tmp_path):
    save_gptq(hf_model(seed=8), tmp_path, bits=4, group_size=64)
    if torch.cuda.is_available():
        pytest.skip("CPU capacity test")
    with pytest.raises(TalisError, match="does not fit"):
        Engine.load(LoadSettings(model_dir=tmp_path, device_map="auto", max_memory="cpu=1MiB"))
    engine = Engine.load(LoadSettings(model_dir=tmp_path, device_map="auto", max_memory="cpu=1GiB"))
    assert engine.plan.devices == ["cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_split_gives_the_one_gpu_greedy_tokens(tmp_path):
    """The embedded model with its 8 layers over two GPUs decodes through a CUDA graph per GPU
    (fast_decode.segments), the hidden state handed from one to the next: the same 64 greedy tokens as on one."""
    from talis_cli.generation import GenerationConfig

    split = tmp_path / "split.json"
    split.write_text('{"layers": {"0-3": 0, "4-7": 1}, "embed_tokens": 0, "norm": 1, "lm_head": 1}')
    greedy = GenerationConfig(temperature=0, max_new_tokens=64)
    replies = []
    for device_map, graphs in (("single_gpu", 1), (str(split), 2)):
        engine = Engine.load(LoadSettings(device_map=device_map, max_seq_len=256))
        layers = {str(layer.input_layernorm.weight.device) for layer in engine.model.model.layers}
        assert layers == ({"cuda:0"} if graphs == 1 else {"cuda:0", "cuda:1"})
        runner = engine.generator.fast_decode
        assert runner is not None and len(runner._steps[1]) == graphs
        ids = engine.encode("In the beginning God created")
        replies.append([event.token_ids[0] for event in engine.generator.stream(ids, greedy)])
    assert len(replies[0]) == 64 and replies[1] == replies[0]


def test_memory_by_device_splits_the_weights_and_the_cache_where_they_sit():
    """`talis info` lists what each device holds once a model spans several; here the last two layers of a small
    float model go to the meta device (sizes kept, no data) in place of a second GPU."""
    from talis_cli.config import ModelArgs
    from talis_cli.model import Transformer
    from talis_cli.model_info import describe, kv_cache_bytes, memory_by_device, weight_bytes_in_memory

    engine = Engine.load(LoadSettings(device_map="cpu", max_seq_len=128))
    weights, kv = weight_bytes_in_memory(engine.model), kv_cache_bytes(engine.args, 128, dtype_bytes=4)
    assert memory_by_device(engine.model) == {"cpu": {"weights_bytes": weights, "kv_cache_bytes": kv}}
    assert "by_device" not in describe(engine)["memory"]  # one device: the totals say it all

    args = ModelArgs(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128)
    model = Transformer(args)
    model.setup_cache(1, 32)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    total, kv = weight_bytes_in_memory(model), kv_cache_bytes(args, 32, dtype_bytes=4)
    for layer in model.model.layers[2:]:
        layer.to("meta")
    assert memory_by_device(model) == {"cpu": {"weights_bytes": total - 2 * layer_bytes, "kv_cache_bytes": kv // 2},
                                       "meta": {"weights_bytes": 2 * layer_bytes, "kv_cache_bytes": kv // 2}}
