"""Write a GPTQ model folder of random weights in a named LLaMA shape, with the embedded model's tokenizer.

    PYTHONPATH=. python3 scripts/random_checkpoint.py --shape 7B --out /tmp/random-7b [--act-order] [--device cuda]

The folder loads like any AutoGPTQ checkpoint (config.json, quantize_config.json, model.safetensors, tokenizer), so
`talis generate/chat --model DIR --stats` and `talis bench --model DIR` can be compared on the same weights
without a download. The vocabulary is the embedded tokenizer's (4096 tokens), so the embedding and the output layer
are smaller than the named shape's; every decoder layer has the shape's sizes.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from talis_cli.bench import SHAPES, random_quant_linear
from talis_cli.engine import DEFAULT_MODEL_DIR

LINEARS = {  # checkpoint name -> (in, out) as functions of (dim, ffn, kv_dim)
    "self_attn.q_proj": lambda d, f, kv: (d, d), "self_attn.k_proj": lambda d, f, kv: (d, kv),
    "self_attn.v_proj": lambda d, f, kv: (d, kv), "self_attn.o_proj": lambda d, f, kv: (d, d),
    "mlp.gate_proj": lambda d, f, kv: (d, f), "mlp.up_proj": lambda d, f, kv: (d, f),
    "mlp.down_proj": lambda d, f, kv: (f, d),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7B", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (quick checks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    shape = SHAPES[opts.shape]
    n_layers = opts.layers or shape.n_layers
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    vocab = config["vocab_size"]
    head_dim = shape.dim // shape.n_heads
    config.update(hidden_size=shape.dim, intermediate_size=shape.intermediate, num_hidden_layers=n_layers,
                  num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, head_dim=head_dim,
                  max_position_embeddings=2048, rope_parameters={"rope_theta": shape.rope_theta, "rope_type": "default"})
    quant = dict(bits=opts.bits, group_size=opts.group_size, desc_act=opts.act_order, sym=True,
                 checkpoint_format="gptq", quant_method="gptq")
    config["quantization_config"] = quant

    gen = torch.Generator(opts.device).manual_seed(0)
    fp16 = dict(dtype=torch.float16, device=opts.device)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, shape.dim, generator=gen, **fp16),
               "model.norm.weight": torch.ones(shape.dim, **fp16),
               "lm_head.weight": torch.randn(vocab, shape.dim, generator=gen, **fp16) / shape.dim ** 0.5}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = torch.ones(shape.dim, **fp16)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(shape.dim, **fp16)
        for name, sizes in LINEARS.items():
            k, n = sizes(shape.dim, shape.intermediate, shape.n_kv_heads * head_dim)
            layer = random_quant_linear(k, n, opts.bits, opts.group_size, opts.act_order, opts.device)
            for part in ("qweight", "qzeros", "scales", "g_idx"):
                tensors[f"{prefix}{name}.{part}"] = getattr(layer, part)
    opts.out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, opts.out / "model.safetensors")
    (opts.out / "config.json").write_text(json.dumps(config, indent=2))
    (opts.out / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, opts.out / name)
    print(f"wrote {opts.out} ({sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
