"""Rows at their own positions (Transformer.decode_rows, forward with cache_row): each row's logits equal those of
its request run alone through the plain forward, whatever the other rows' lengths, when they joined, and which
cache row they hold; on a plain, a GQA + sliding-window and a dynamic-NTK model."""

import pytest
import torch

from talis_cli.config import ModelArgs
from talis_cli.model import Transformer

CONTEXT = 40


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, intermediate_size=128,
                  max_position_embeddings=CONTEXT)
    fields.update(overrides)
    model = Transformer(ModelArgs(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.double()


MODELS = {
    "plain": dict(),
    "gqa_window": dict(n_kv_heads=2, sliding_window=6),
    "dynamic_ntk": dict(n_kv_heads=1, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@torch.inference_mode()
def alone(model, prompt: list[int], fed: list[int]) -> torch.Tensor:
    """Logits [1 + len(fed), vocab] of `prompt`'s prefill, then of each token of `fed` decoded one by one, through
    the plain forward on a one-row cache."""
    model.setup_cache(1, CONTEXT)
    out = [model(torch.tensor([prompt]), last_only=True)[0, -1]]
    for i, token in enumerate(fed):
        out.append(model(torch.tensor([[token]]), start_pos=len(prompt) + i)[0, -1])
    return torch.stack(out)


@torch.inference_mode()
def scheduled(model, requests: list[dict], steps: int, chunk: int = 5) -> dict[int, torch.Tensor]:
    """Run `requests` ({prompt, fed, row, join: the step it is prefilled before}) on one cache: prefill in chunks
    of `chunk` into its own cache row, then one decode_rows step per step over every running row."""
    model.setup_cache(4, CONTEXT)
    logits = {i: [] for i in range(len(requests))}
    running = {}  # request -> tokens fed so far
    for step in range(steps):
        for i, r in enumerate(requests):
            if r["join"] == step:
                p = r["prompt"]
                for start in range(0, len(p), chunk):
                    last = model(torch.tensor([p[start : start + chunk]]), start_pos=start, last_only=True,
                                 cache_row=r["row"])
                logits[i].append(last[0, -1])
                running[i] = 0
        live = [i for i in running if running[i] < len(requests[i]["fed"])]
        if not live:
            continue
        tokens = torch.tensor([requests[i]["fed"][running[i]] for i in live])
        slots = torch.tensor([len(requests[i]["prompt"]) + running[i] for i in live])
        rows = torch.tensor([requests[i]["row"] for i in live])
        out = model.decode_rows(tokens, slots, rows)
        assert out.shape == (len(live), model.args.vocab_size) and out.dtype == torch.float32
        for b, i in enumerate(live):
            logits[i].append(out[b])
            running[i] += 1
    return {i: torch.stack(v) for i, v in logits.items()}


@pytest.mark.parametrize("name", MODELS)
def test_rows_at_their_own_positions_match_each_request_alone(name):
    model = tiny(**MODELS[name])
    g = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()  # noqa: E731
    requests = [
        dict(prompt=draw(3), fed=draw(20), row=2, join=0),
        dict(prompt=draw(12), fed=draw(9), row=0, join=2),  # joins late, longer prompt: prefilled in 3 chunks
        dict(prompt=draw(1), fed=draw(6), row=3, join=5),
        dict(prompt=draw(7), fed=draw(4), row=1, join=12),  # joins after row 0's request has finished
    ]
    got = scheduled(model, requests, steps=22)
    for i, r in enumerate(requests):
        want = alone(model, r["prompt"], r["fed"])
        assert got[i].shape == want.shape
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


def test_a_reused_cache_row_is_overwritten_by_its_next_request():
    """A finished request's row, taken by another request, gives that request's logits, not a mix."""
    model = tiny(n_kv_heads=2)
    first = dict(prompt=[5, 6, 7, 8, 9, 10, 11], fed=[1, 2, 3, 4, 5, 6], row=1, join=0)
    second = dict(prompt=[40, 41], fed=[3, 3, 3], row=1, join=8)
    got = scheduled(model, [first, second], steps=12)
    torch.testing.assert_close(got[1], alone(model, second["prompt"], second["fed"]), rtol=0, atol=1e-5)
