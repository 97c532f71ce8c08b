"""Small random LLaMA models written to disk the way users' checkpoints are, for loader and parity tests.

The tokenizer is the embedded model's (tests/data/kjv/fp16), so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_DIR = Path(__file__).parent / "data" / "kjv" / "fp16"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(**overrides) -> dict:
    cfg = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


def hf_model(seed: int = 0, **overrides):
    """transformers' LlamaForCausalLM with random weights (std 0.05, so logits are far from flat)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(**overrides))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return model


def copy_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (TOKENIZER_DIR / name).exists():
            shutil.copy(TOKENIZER_DIR / name, folder / name)


def save_fp16(model, folder: Path, dtype=torch.float16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"))
    copy_tokenizer(folder)
    return folder


def quantize_tensors(model, bits: int, group_size: int, act_order: bool = False, sym: bool = True, seed: int = 0):
    """GPTQ-quantize every decoder linear (random correlated calibration data), the rest stays fp16.

    Returns (state dict in the AutoGPTQ layout, {linear name: dequantized weight [out, in]}).
    """
    from quant_kernels.gptq import GPTQ

    gen = torch.Generator().manual_seed(seed)
    sd, dequantized = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(n) for n in LINEAR_NAMES):
            weight = tensor.float()
            gptq = GPTQ(weight)
            x = torch.randn(256, weight.shape[1], generator=gen) @ torch.randn(weight.shape[1], weight.shape[1], generator=gen) * 0.1
            gptq.add_batch(x)
            packed = gptq.quantize(bits, group_size, sym=sym, act_order=act_order)
            for k, v in packed.tensors().items():
                sd[f"{module}.{k}"] = v.contiguous()
            dequantized[module] = packed.dequantize()
        elif not (name == "lm_head.weight" and model.config.tie_word_embeddings):
            sd[name] = tensor.half().contiguous()
    return sd, dequantized


def save_gptq(model, folder: Path, bits: int = 4, group_size: int = 128, act_order: bool = False,
              sym: bool = True, shards: int = 1, config_style: str = "quantize_config"):
    """Write an AutoGPTQ-style folder; return the dequantized weights by linear name."""
    folder.mkdir(parents=True, exist_ok=True)
    sd, dequantized = quantize_tensors(model, bits, group_size, act_order, sym)
    qc = dict(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, true_sequential=True,
              damp_percent=0.01, static_groups=False, checkpoint_format="gptq", model_file_base_name="model",
              quant_method="gptq")
    model.config.save_pretrained(folder)
    if config_style == "quantize_config":
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    else:  # inside config.json, as transformers/optimum write it
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = qc
        (folder / "config.json").write_text(json.dumps(cfg))
    write_shards(sd, folder, shards)
    copy_tokenizer(folder)
    return dequantized


def write_shards(sd: dict, folder: Path, shards: int) -> None:
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
        return
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def with_weights(model, weights: dict):
    """A copy of the HF model with the given linear weights [out, in] put in and every other weight rounded
    to fp16 as the checkpoint stores it (to compare with quantized runs)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.half().float())
        for name, w in weights.items():
            out.get_submodule(name).weight.copy_(w)
    return out
