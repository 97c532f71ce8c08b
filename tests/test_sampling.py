"""Sampling filters and penalties against plain per-row references on fresh random logits."""

import math

import pytest
import torch

from talis_cli.generation import GenerationConfig
from talis_cli.sampling import (
    Sampler,
    apply_penalties,
    candidates,
    min_p_mask,
    sample_from,
    top_p_mask,
    truncated_distribution,
    typical_mask,
)

V = 50  # vocabulary of the random rows


def random_logits(seed: int, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def by_probability(row) -> list[tuple[float, int]]:
    """(probability, token) pairs of a row of logits, most likely first."""
    probs = torch.softmax(row.double(), -1).tolist()
    return sorted(((p, i) for i, p in enumerate(probs)), reverse=True)


def smallest_set_reaching(ordered: list[tuple[float, int]], mass: float) -> set[int]:
    chosen, total = set(), 0.0
    for p, i in ordered:
        chosen.add(i)
        total += p
        if total >= mass:
            break
    return chosen


def kept_ids(probs, ids) -> list[set[int]]:
    """Token ids with non-zero probability, per row; ids None means the position is the token."""
    rows = []
    for b in range(probs.shape[0]):
        positions = torch.nonzero(probs[b] > 0).flatten()
        rows.append(set((positions if ids is None else ids[b, positions]).tolist()))
    return rows


def masked_ids(mask) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 17])
def test_candidates_are_the_k_largest_in_order(seed, k):
    logits = random_logits(seed)
    values, ids = candidates(logits, k, need_order=False)
    assert [set(r.tolist()) for r in ids] == [{i for _, i in by_probability(row)[:k]} for row in logits]
    assert torch.all(values[:, :-1] >= values[:, 1:]) and torch.equal(logits.gather(-1, ids), values)
    values, ids = candidates(logits, 0, need_order=True)
    assert torch.equal(ids, torch.argsort(logits, dim=-1, descending=True))
    assert candidates(logits, 0, need_order=False) == (logits, None)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p):
    logits = random_logits(seed)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    keep = top_p_mask(torch.softmax(sorted_logits, -1), p)
    expected = [smallest_set_reaching(by_probability(row), p) for row in logits]
    assert [set(order[b][keep[b]].tolist()) for b in range(len(logits))] == expected


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_keeps_tokens_near_the_top(seed, min_p):
    logits = random_logits(seed)
    expected = []
    for row in logits:
        ordered = by_probability(row)
        expected.append({i for p, i in ordered if p >= min_p * ordered[0][0]})
    assert masked_ids(min_p_mask(torch.softmax(logits, -1), min_p)) == expected


def reference_typical(probs: list[float], mass: float) -> set[int]:
    """HF's locally typical filter on a normalized distribution (zeros are already removed)."""
    live = [(p, i) for i, p in enumerate(probs) if p > 0]
    entropy = -sum(p * math.log(p) for p, _ in live)
    by_distance = sorted((abs(-math.log(p) - entropy), p, i) for p, i in live)
    return smallest_set_reaching([(p, i) for _, p, i in by_distance], mass)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mass", [0.2, 0.6, 0.95])
def test_typical_keeps_tokens_closest_to_the_entropy(seed, mass):
    logits = random_logits(seed)
    logits[:, :5] = float("-inf")  # already filtered tokens stay out
    probs = torch.softmax(logits, -1)
    expected = [reference_typical(row.double().tolist(), mass) for row in probs]
    assert masked_ids(typical_mask(probs, mass)) == expected


def reference_chain(row, cfg) -> set[int]:
    """temperature -> top_k -> top_p -> min_p -> typical_p, each on the survivors renormalized."""
    survivors = by_probability(row / cfg.temperature)
    if cfg.top_k:
        survivors = survivors[: cfg.top_k]
    def renormalized(pairs):
        total = sum(p for p, _ in pairs)
        return [(p / total, i) for p, i in pairs]
    survivors = renormalized(survivors)
    nucleus = smallest_set_reaching(survivors, cfg.top_p)
    survivors = [(p, i) for p, i in survivors if i in nucleus]
    survivors = renormalized([(p, i) for p, i in survivors if p >= cfg.min_p * survivors[0][0]])
    if cfg.typical_p < 1:
        probs = [0.0] * V
        for p, i in survivors:
            probs[i] = p
        return reference_typical(probs, cfg.typical_p)
    return {i for _, i in survivors}


@pytest.mark.parametrize("cfg", [
    GenerationConfig(temperature=0.7, top_k=8, top_p=0.8, min_p=0.3),
    GenerationConfig(temperature=1.3, top_k=0, top_p=0.7, min_p=0.0),
    GenerationConfig(temperature=0.9, top_k=0, top_p=1.0, min_p=0.2),
    GenerationConfig(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.5),
    GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.7),
], ids=["k-p-min", "p", "min", "all", "typical"])
def test_filters_apply_in_order_after_temperature(cfg):
    logits = random_logits(11) / 3  # flat rows: the top 8 hold well under 80% before renormalizing
    probs, ids = truncated_distribution(logits, cfg)
    assert kept_ids(probs, ids) == [reference_chain(row, cfg) for row in logits]


def test_penalties_match_a_hand_computed_reference():
    logits = random_logits(3)
    counts = torch.randint(0, 3, logits.shape, generator=torch.Generator().manual_seed(4)).float()
    rep, freq, pres = 1.3, 0.4, -0.7
    expected = logits.clone()
    for b in range(logits.shape[0]):
        for v in range(V):
            c = int(counts[b, v])
            x = float(logits[b, v])
            if c > 0:
                x = x / rep if x > 0 else x * rep
                x = x - freq * c - pres
            expected[b, v] = x
    torch.testing.assert_close(apply_penalties(logits, counts, rep, freq, pres), expected)
    assert torch.equal(apply_penalties(logits, counts, 1.0, 0.0, 0.0), logits)


def reference_counts(history, pad_lens, filled: int, window: int):
    counts = torch.zeros(history.shape[0], V)
    for b in range(history.shape[0]):
        start = max(int(pad_lens[b]), filled - window if window else 0)
        for slot in range(start, filled):
            counts[b, history[b, slot]] += 1
    return counts


@pytest.mark.parametrize("window", [0, 1, 5])
def test_penalty_window_counts_prompt_and_reply_but_not_padding(window):
    g = torch.Generator().manual_seed(window)
    S, T = 24, 8
    history = torch.randint(0, V, (3, S), generator=g)
    pad_lens = torch.tensor([0, 3, 7])
    cfg = GenerationConfig(repetition_penalty=1.2, repetition_window=window)
    sampler = Sampler(cfg, history, pad_lens, T, V)
    assert torch.equal(sampler.counts, reference_counts(history, pad_lens, T, window))
    for filled in range(T + 1, S):
        sampler.append(torch.randint(0, V, (3,), generator=g))
        assert torch.equal(sampler.counts, reference_counts(history, pad_lens, filled, window))


def test_temperature_zero_is_exact_argmax():
    logits = random_logits(5, rows=8)
    sampler = Sampler(GenerationConfig(temperature=0), torch.zeros(8, 4, dtype=torch.long), None, 1, V)
    assert torch.equal(sampler(logits), logits.argmax(-1))


def test_same_seed_same_tokens_and_other_seeds_differ():
    logits = random_logits(6, rows=64) / 3  # flat enough that draws vary

    def draw(seed):
        sampler = Sampler(GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                          torch.zeros(64, 4, dtype=torch.long), None, 1, V)
        return torch.stack([sampler(logits) for _ in range(3)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_draws_follow_the_distribution_and_stay_in_the_kept_set():
    n = 20000
    logits = (random_logits(8, rows=1) / 2).expand(n, V)
    probs, ids = truncated_distribution(logits, GenerationConfig(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0))
    tokens = ids.gather(-1, sample_from(probs, torch.Generator().manual_seed(0))[:, None]).squeeze(-1)
    assert set(tokens.tolist()) <= set(ids[0].tolist())
    freq = torch.bincount(tokens, minlength=V).double() / n
    expected = torch.zeros(V, dtype=torch.float64)
    expected[ids[0]] = probs[0].double() / probs[0].sum()
    # 5 standard errors of a frequency estimate from n draws
    assert torch.all((freq - expected).abs() <= 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-9)
