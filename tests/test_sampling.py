"""Sampling filters and penalties against plain per-row references on fresh random logits."""

import math

import pytest
import torch

from talis_cli.generation import GenerationConfig
from talis_cli.sampling import (
    Sampler,
    apply_penalties,
    filter_logits,
    min_p_filter,
    sample_from,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

V = 50  # vocabulary of the random rows


def random_logits(seed: int, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def kept(logits) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def by_probability(row) -> list[tuple[float, int]]:
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


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_keeps_the_k_largest(seed, k):
    logits = random_logits(seed)
    expected = [{i for _, i in by_probability(row)[:k]} for row in logits]
    assert kept(top_k_filter(logits, k)) == expected
    assert top_k_filter(logits, 0) is logits


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p):
    logits = random_logits(seed)
    expected = [smallest_set_reaching(by_probability(row), p) for row in logits]
    assert kept(top_p_filter(logits, p)) == expected


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_keeps_tokens_near_the_top(seed, min_p):
    logits = random_logits(seed)
    expected = []
    for row in logits:
        ordered = by_probability(row)
        expected.append({i for p, i in ordered if p >= min_p * ordered[0][0]})
    assert kept(min_p_filter(logits, min_p)) == expected


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mass", [0.2, 0.6, 0.95])
def test_typical_keeps_tokens_closest_to_the_entropy(seed, mass):
    logits = random_logits(seed)
    expected = []
    for row in logits:
        probs = torch.softmax(row.double(), -1).tolist()
        entropy = -sum(p * math.log(p) for p in probs)
        by_distance = sorted((abs(-math.log(p) - entropy), i) for i, p in enumerate(probs))
        expected.append(smallest_set_reaching([(probs[i], i) for _, i in by_distance], mass))
    assert kept(typical_filter(logits, mass)) == expected


def test_filters_apply_in_order_after_temperature():
    """temperature -> top_k -> top_p (on the renormalized top k) -> min_p."""
    logits = random_logits(11) / 3  # flat rows: the top 8 hold well under 80% before renormalizing
    cfg = GenerationConfig(temperature=0.7, top_k=8, top_p=0.8, min_p=0.3)
    expected = []
    for row in logits / 0.7:
        survivors = by_probability(row)[:8]
        total = sum(p for p, _ in survivors)
        survivors = [(p / total, i) for p, i in survivors]
        nucleus = smallest_set_reaching(survivors, 0.8)
        survivors = [(p, i) for p, i in survivors if i in nucleus]
        expected.append({i for p, i in survivors if p >= 0.3 * survivors[0][0]})
    assert kept(filter_logits(logits, cfg)) == expected


def test_penalties_match_a_hand_computed_reference():
    logits = random_logits(3)
    counts = torch.randint(0, 3, logits.shape, generator=torch.Generator().manual_seed(4))
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
    counts = torch.zeros(history.shape[0], V, dtype=torch.int32)
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
    row = random_logits(8, rows=1)[0] / 2
    n = 20000
    logits = top_k_filter(row.expand(n, V), 6)
    tokens = sample_from(logits, torch.Generator().manual_seed(0))
    allowed = kept(logits[:1])[0]
    assert set(tokens.tolist()) <= allowed
    freq = torch.bincount(tokens, minlength=V).double() / n
    probs = torch.softmax(logits[0].double(), -1)
    # 5 standard errors of a frequency estimate from n draws
    assert torch.all((freq - probs).abs() <= 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-9)
