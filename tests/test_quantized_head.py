"""A GPTQ-quantized lm_head (GPTQModel / AutoGPTQ with `lm_head: true`: lm_head.qweight/qzeros/scales/g_idx),
tied and untied, against transformers' LlamaForCausalLM carrying the dequantized weights.

The head runs through the same QuantLinear backends as the other linears: torch / torch_dense on the CPU, the
Triton kernels (checked here under TRITON_INTERPRET=1 at a small shape, and on a GPU by the test marked gpu).
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

from quant_kernels.quant_linear import QuantLinear
from talis_cli.engine import Engine, LoadSettings
from tests.test_cli import greedy_text, run_talis
from tests.test_parity import _greedy_hf, _greedy_talis
from tests.tiny_models import hf_model, save_gptq, with_weights

TOKENS = torch.randint(3, 4096, (2, 20), generator=torch.Generator().manual_seed(7))
TIED = {"untied": False, "tied": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"untied"|"tied": (folder, the HF model, dequantized weights by linear name)}; act-order, 4-bit g32."""
    out = {}
    for name, tied in TIED.items():
        hf = hf_model(seed=21 + tied, tie_word_embeddings=tied, num_key_value_heads=2)
        folder = tmp_path_factory.mktemp(f"qhead_{name}")
        out[name] = folder, hf, save_gptq(hf, folder, bits=4, group_size=32, act_order=True, lm_head=True)
    return out


def load(folder, backend="torch"):
    return Engine.load(LoadSettings(model_dir=folder, device_map="cpu", backend=backend, max_seq_len=64))


def logits_of(engine):
    engine.model.clear_cache()
    with torch.no_grad():
        return engine.model(TOKENS)


def relative_diff(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["torch", "torch_dense"])
@pytest.mark.parametrize("kind", sorted(TIED))
def test_quantized_head_logits_and_greedy_match_transformers(folders, kind, backend):
    folder, hf, dequantized = folders[kind]
    assert "lm_head" in dequantized
    engine = load(folder, backend)
    head = engine.model.lm_head
    assert isinstance(head, QuantLinear) and head.backend_name == backend
    # the embedding stays the file's fp16 one, also when config.json ties it to the head
    torch.testing.assert_close(engine.model.model.embed_tokens.weight, hf.model.embed_tokens.weight.half().float())
    reference = with_weights(hf, dequantized)
    with torch.no_grad():
        theirs = reference(TOKENS).logits
        fp16_head = with_weights(hf, {k: v for k, v in dequantized.items() if k != "lm_head"})(TOKENS).logits
    ours = logits_of(engine)
    assert relative_diff(ours, theirs) < 1e-4
    assert relative_diff(fp16_head, theirs) > 1e-2  # the quantized head is what the logits come from
    engine.model.setup_cache(1, 64)
    prompt = TOKENS[0, :8].tolist()
    assert _greedy_talis(engine, prompt, 16) == _greedy_hf(reference, prompt, 16)


def test_generate_and_info_through_the_cli(folders):
    """The tied case, where config.json's tie_word_embeddings and the quantized head meet (subprocesses are slow:
    the untied one is checked in-process below)."""
    folder, hf, _ = folders["tied"]
    engine = Engine.load(LoadSettings(model_dir=folder, device_map="cpu"))  # as the CLI loads it: default backend
    result = run_talis("generate", "-m", folder, "--device-map", "cpu", "-p", "In the beginning", "--temperature", "0",
                       "-n", "10")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == greedy_text(engine, [engine.encode("In the beginning")], 10)[0] + "\n"
    result = run_talis("info", "-m", folder, "--json", "--device-map", "cpu", "--backend", "torch")
    assert result.returncode == 0, result.stderr.decode()
    assert_info_counts_the_head(json.loads(result.stdout), folder, hf)


def test_info_of_an_untied_quantized_head(folders):
    folder, hf, _ = folders["untied"]
    assert_info_counts_the_head(json.loads(json.dumps(load(folder).info, default=str)), folder, hf)


def assert_info_counts_the_head(facts: dict, folder, hf) -> None:
    """`talis info` of a CPU model on the torch backend: quantized head, parameters as trained, bytes as held."""
    assert facts["quantization"]["lm_head"] is True
    assert facts["architecture"]["tied_embeddings"] is False  # a quantized head has weights of its own
    vocab, dim = hf.config.vocab_size, hf.config.hidden_size
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    assert facts["parameters"] == sum(p.numel() for p in hf.parameters()) + (vocab * dim if tied else 0)
    # On the CPU every float of the file is held in fp32 and every GPTQ integer in an int32: 4 bytes a value. The
    # torch backend adds per quantized layer its zero points unpacked (fp32, the scales' shape) and g_idx as int64.
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    held = sum(4 * math.prod(shape) for shape in shapes.values())
    held += sum(4 * math.prod(shape) for name, shape in shapes.items() if name.endswith(".scales"))
    held += sum(8 * math.prod(shape) for name, shape in shapes.items() if name.endswith(".g_idx"))
    assert "lm_head.qweight" in shapes and "lm_head.weight" not in shapes
    assert facts["memory"]["weights_bytes"] == held


def test_triton_head_in_the_decode_step_under_the_interpreter():
    """An act-order quantized head on the Triton kernels (under TRITON_INTERPRET=1 without a GPU; a small vocabulary
    keeps the interpreter quick): logits as with the torch backend, and the decode step of the CUDA-graph path
    (final norm written in the head's input order, then the head's GEMV) as the plain forward."""
    from quant_kernels.gptq import GPTQ
    from quant_kernels.triton_backend import PreparedWeight, input_gather
    from talis_cli.fast_decode import DecodeStep
    from tests.test_fast_decode import DEVICE, tiny_model

    gen = torch.Generator().manual_seed(3)
    model = tiny_model(seed=4, vocab_size=256, num_hidden_layers=1)
    gptq = GPTQ(model.lm_head.weight.detach())
    gptq.add_batch(torch.randn(256, 128, generator=gen) @ torch.randn(128, 128, generator=gen) * 0.1)
    packed = gptq.quantize(4, 32, act_order=True)
    model.lm_head = QuantLinear.from_quantized(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, 4, 32)
    model = model.to(DEVICE, torch.float16)
    prompt = torch.randint(0, 256, (1, 6), generator=gen).to(DEVICE)
    token = torch.randint(0, 256, (1, 1), generator=gen).to(DEVICE)
    with torch.no_grad():
        expected = model(prompt)
        model.lm_head.set_backend("triton")
        assert isinstance(model.lm_head.backend_state, PreparedWeight) and input_gather(model.lm_head) is not None
        assert relative_diff(model(prompt), expected) < 5e-3
        model.setup_cache(1, 16)
        model(prompt)
        caches = [(layer.self_attn.kv_cache.k.clone(), layer.self_attn.kv_cache.v.clone())
                  for layer in model.model.layers]
        plain = model(token, start_pos=6)[:, -1]
        for layer, (k, v) in zip(model.model.layers, caches):  # the step writes slot 6 again, from the same state
            layer.self_attn.kv_cache.k.copy_(k)
            layer.self_attn.kv_cache.v.copy_(v)
        step = DecodeStep(model, 1)
        step.tokens.copy_(token[:, 0])
        step.slot.fill_(6)
        fast = step.run(capacity=16)
    # fp16 on two paths: one ulp of a logit is ~0.002 here; reading the head's input in the wrong order is off by O(1)
    torch.testing.assert_close(fast, plain, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", sorted(TIED))
def test_quantized_head_on_the_gpu_triton_path(folders, kind):
    """Loaded as users run it on a GPU: Triton backend, fused layers, CUDA-graph decode step including the head."""
    from quant_kernels.triton_backend import PreparedWeight
    from tests.test_fast_decode import greedy

    folder, hf, dequantized = folders[kind]
    engine = Engine.load(LoadSettings(model_dir=folder, device_map="auto", max_seq_len=128))
    model = engine.model
    assert engine.backend == "triton" and model.logits_device.type == "cuda"
    assert isinstance(model.lm_head.backend_state, PreparedWeight)  # the head's own GEMV, no fallback
    runner = engine.generator.fast_decode
    assert runner is not None
    with torch.no_grad():
        theirs = with_weights(hf, dequantized).to("cuda", torch.float16)(TOKENS.cuda()).logits.float()
    model.clear_cache()
    with torch.no_grad():
        assert relative_diff(model(TOKENS.cuda()), theirs) < 2e-2
    prompt = TOKENS[:1, :10].cuda()
    assert greedy(model, prompt, 24, runner) == greedy(model, prompt, 24)
