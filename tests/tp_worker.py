"""Run as a script by tests/test_tensor_parallel.py: load a model with tensor parallelism (this process is rank 0)
and without, then print one JSON object comparing them.

    python tests/tp_worker.py [--model DIR] [--size N] [--tokens T]

Output: max_abs_diff / max_abs of the prefill logits, the greedy ids of one prompt and of a padded batch of two,
from both engines, and the shapes rank 0 holds.
"""
import argparse
import json

import torch


def greedy(engine, prompts, n):
    from talis_cli.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0)
    ids = [[] for _ in prompts]
    for event in engine.generator.stream_batch(prompts, cfg):
        ids[event.index] += event.token_ids
    return ids


def main() -> None:
    from talis_cli.engine import Engine, LoadSettings

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    opts = parser.parse_args()
    tp = Engine.load(LoadSettings(model_dir=opts.model, tensor_parallel=opts.size))
    one = Engine.load(LoadSettings(model_dir=opts.model))
    prompts = [tp.encode("And God said"), tp.encode("In the beginning God created the heaven")]
    tokens = torch.tensor([prompts[1]])
    with torch.inference_mode():
        a, b = tp.model(tokens), one.model(tokens)
    shard = tp.model.shard
    print(json.dumps(dict(
        max_abs_diff=(a - b).abs().max().item(), max_abs=b.abs().max().item(),
        tp_single=greedy(tp, prompts[:1], opts.tokens), one_single=greedy(one, prompts[:1], opts.tokens),
        tp_batch=greedy(tp, prompts, opts.tokens), one_batch=greedy(one, prompts, opts.tokens),
        heads=[shard.args.n_heads, shard.args.n_kv_heads, shard.args.intermediate_size],
        full_heads=[one.args.n_heads, one.args.n_kv_heads, one.args.intermediate_size])))


if __name__ == "__main__":
    main()
