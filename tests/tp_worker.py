"""Run as a script by tests/test_tensor_parallel.py: load a model with tensor parallelism (this process is rank 0)
and without, then print one JSON object comparing them.

    python tests/tp_worker.py [--model DIR] [--size N] [--tokens T] [--cpu] [--kv-cache fp16|int8]

Output: max_abs_diff / max_abs of the prefill logits, the greedy ids of one prompt and of a padded batch of two
from both engines, the sizes rank 0 holds, and `first_diff` where the single prompt's greedy ids part: the index,
the one-process logits' gap between its top two tokens there and the largest logit difference between the two
engines on the same tokens (a near-tie that reduction order may flip), or None; `cache`: the dtype and KV heads
of rank 0's KV cache.
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


def first_diff(tp, one, prompt, a, b):
    index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if index is None:
        return None
    tokens = torch.tensor([prompt + a[:index]])
    with torch.inference_mode():
        la, lb = tp.model(tokens, last_only=True)[0, -1], one.model(tokens, last_only=True)[0, -1]
    top = lb.topk(2).values
    return dict(index=index, top2_gap=(top[0] - top[1]).item(), max_abs_diff=(la.cpu() - lb.cpu()).abs().max().item())


def main() -> None:
    from talis_cli.engine import Engine, LoadSettings

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="CPU processes over gloo even where there are GPUs")
    parser.add_argument("--kv-cache", default="fp16", help="KV cache type of both engines")
    opts = parser.parse_args()
    device_map = "cpu" if opts.cpu else "auto"
    one_map = "cpu" if opts.cpu else "single_gpu" if torch.cuda.is_available() else "auto"
    tp = Engine.load(LoadSettings(model_dir=opts.model, tensor_parallel=opts.size, device_map=device_map,
                                  kv_cache=opts.kv_cache))
    one = Engine.load(LoadSettings(model_dir=opts.model, device_map=one_map, kv_cache=opts.kv_cache))
    prompts = [tp.encode("And God said"), tp.encode("In the beginning God created the heaven")]
    tokens = torch.tensor([prompts[1]])
    with torch.inference_mode():
        a, b = tp.model(tokens).cpu(), one.model(tokens).cpu()
    shard = tp.model.shard
    rank0_cache = tp.model.model.layers[0].self_attn.kv_cache
    tp_single, one_single = greedy(tp, prompts[:1], opts.tokens), greedy(one, prompts[:1], opts.tokens)
    print(json.dumps(dict(
        max_abs_diff=(a - b).abs().max().item(), max_abs=b.abs().max().item(),
        tp_single=tp_single, one_single=one_single,
        tp_batch=greedy(tp, prompts, opts.tokens), one_batch=greedy(one, prompts, opts.tokens),
        first_diff=first_diff(tp, one, prompts[0], tp_single[0], one_single[0]),
        heads=[shard.args.n_heads, shard.args.n_kv_heads, shard.args.intermediate_size],
        full_heads=[one.args.n_heads, one.args.n_kv_heads, one.args.intermediate_size],
        cache=[str(rank0_cache.k.dtype), rank0_cache.k.shape[1]])))


if __name__ == "__main__":
    main()
