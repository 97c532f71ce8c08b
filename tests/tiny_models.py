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


def quantize_tensors(model, bits: int, group_size: int, act_order: bool = False, sym: bool = True, seed: int = 0,
                     lm_head: bool = False):
    """GPTQ-quantize every decoder linear (random correlated calibration data), and `lm_head` too when asked (as
    GPTQModel and AutoGPTQ do with `lm_head: true`: a tied head is quantized from the embedding, which stays
    fp16); the rest stays fp16.

    Returns (state dict in the AutoGPTQ layout, {linear name: dequantized weight [out, in]}).
    """
    from quant_kernels.gptq import GPTQ

    gen = torch.Generator().manual_seed(seed)
    sd, dequantized = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(n) for n in LINEAR_NAMES) or (lm_head and name == "lm_head.weight"):
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


def to_gptq_v2(sd: dict, bits: int) -> dict:
    """The same weights in the "gptq_v2" format: every qzeros word holds the zero itself, not zero - 1."""
    from quant_kernels import gptq_format

    out = dict(sd)
    for name, tensor in sd.items():
        if name.endswith(".qzeros"):
            cols = sd[name.replace(".qzeros", ".scales")].shape[1]
            out[name] = gptq_format.pack_cols(gptq_format.unpack_cols(tensor, bits, cols) + 1, bits)
    return out


def save_gptq(model, folder: Path, bits: int = 4, group_size: int = 128, act_order: bool = False,
              sym: bool = True, shards: int = 1, config_style: str = "quantize_config", lm_head: bool | None = None,
              format_keys: dict | None = None, base_name: str = "model", index_name: str | None = None):
    """Write an AutoGPTQ-style folder; return the dequantized weights by linear name.

    lm_head: None writes no `lm_head` key and an fp16 head; True/False write the key, True a quantized head.
    format_keys: the format key(s) of the quantize config (default {"checkpoint_format": "gptq"}); the weights are
    written in the format they name (`format` wins, as in GPTQModel). base_name: `model_file_base_name` and the
    weight files' stem; index_name: the shard index's name (default `<base_name>.safetensors.index.json`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    sd, dequantized = quantize_tensors(model, bits, group_size, act_order, sym, lm_head=bool(lm_head))
    format_keys = {"checkpoint_format": "gptq"} if format_keys is None else format_keys
    if format_keys.get("format", format_keys.get("checkpoint_format")) == "gptq_v2":
        sd = to_gptq_v2(sd, bits)
    qc = dict(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, true_sequential=True,
              damp_percent=0.01, static_groups=False, **format_keys, model_file_base_name=base_name,
              quant_method="gptq")
    if lm_head is not None:
        qc["lm_head"] = lm_head
    model.config.save_pretrained(folder)
    if config_style == "quantize_config":
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    else:  # inside config.json, as transformers/optimum write it
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = qc
        (folder / "config.json").write_text(json.dumps(cfg))
    write_shards(sd, folder, shards, base_name, index_name)
    copy_tokenizer(folder)
    return dequantized


def write_shards(sd: dict, folder: Path, shards: int, base_name: str = "model", index_name: str | None = None) -> None:
    """`<base_name>.safetensors`, or `shards` files `<base_name>-0000i-of-0000n.safetensors` with a shard index
    (`index_name`, default `<base_name>.safetensors.index.json`; False writes none)."""
    if shards == 1:
        save_file(sd, str(folder / f"{base_name}.safetensors"))
        return
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"{base_name}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    if index_name is not False:
        index = folder / (index_name or f"{base_name}.safetensors.index.json")
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def with_weights(model, weights: dict):
    """A copy of the HF model with the given linear weights [out, in] put in and every other weight rounded
    to fp16 as the checkpoint stores it (to compare with quantized runs). A tied model given an `lm_head` weight
    gets its own head (the quantized head of a tied checkpoint) and keeps its fp16 embedding."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        if "lm_head" in weights and out.lm_head.weight is out.model.embed_tokens.weight:
            out.lm_head.weight = torch.nn.Parameter(out.lm_head.weight.detach().clone())
        for p in out.parameters():
            p.copy_(p.half().float())
        for name, w in weights.items():
            out.get_submodule(name).weight.copy_(w)
    return out
