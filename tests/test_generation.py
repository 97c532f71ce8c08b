"""The streaming Generator on a tiny random model, against full-sequence forwards without a cache."""

import random

import pytest
import torch

from talis_cli.config import ModelArgs
from talis_cli.errors import TalisError, UsageError
from talis_cli.generation import GenerationConfig, Generator, StopStringFilter
from talis_cli.sampling import apply_penalties
from test_detokenize import byte_level_tokenizer  # any token sequence decodes exactly with it

CONTEXT = 48
GREEDY = GenerationConfig(temperature=0, max_new_tokens=20)
SAMPLING = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=20)
PENALTIES = dict(repetition_penalty=1.5, repetition_window=4, frequency_penalty=0.5, presence_penalty=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def build_model(vocab_size: int, device="cpu", dtype=torch.float64):
    from talis_cli.model import Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     intermediate_size=128, max_position_embeddings=CONTEXT)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)  # peaked logits, so sampled and greedy runs differ
    return model.to(device=device, dtype=dtype)  # float64 on CPU: padding cannot flip an argmax


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer))


def generator(model, tokenizer, eos_ids=(), context=CONTEXT):
    return Generator(model, tokenizer, eos_ids, context)


def prompt(tokenizer, text="And God said, Let there be light"):
    return tokenizer.encode(text)


def run(gen, prompt_ids, cfg):
    events = list(gen.stream(prompt_ids, cfg))
    return [e.token_ids[0] for e in events], "".join(e.text for e in events), events


@torch.inference_mode()
def reference_greedy(model, prompt_ids, n, penalties=None):
    """Argmax of a full forward over the whole sequence at each step (no cache), penalties optional."""
    model.clear_cache()
    seq = list(prompt_ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[:, -1]
        if penalties:
            window = seq[-penalties["repetition_window"]:] if penalties["repetition_window"] else seq
            counts = torch.bincount(torch.tensor(window), minlength=logits.shape[-1])[None]
            logits = apply_penalties(logits, counts, penalties["repetition_penalty"],
                                     penalties["frequency_penalty"], penalties["presence_penalty"])
        seq.append(int(logits.argmax()))
    return seq[len(prompt_ids):]


def visible_text(tokenizer, ids):
    """Full decode without special tokens."""
    skip = set(tokenizer.all_special_ids)
    return tokenizer.decode([t for t in ids if t not in skip], clean_up_tokenization_spaces=False)


def test_greedy_equals_argmax_of_full_forward(model, tokenizer):
    p = prompt(tokenizer)
    tokens, text, events = run(generator(model, tokenizer), p, GREEDY)
    assert tokens == reference_greedy(model, p, GREEDY.max_new_tokens)
    assert text == visible_text(tokenizer, p + tokens)[len(visible_text(tokenizer, p)):]
    assert [e.finish_reason for e in events] == [None] * 19 + ["length"]


def test_penalties_follow_the_reference(model, tokenizer):
    p = prompt(tokenizer)
    cfg = GREEDY.with_overrides(**PENALTIES)
    tokens, _, _ = run(generator(model, tokenizer), p, cfg)
    assert tokens == reference_greedy(model, p, cfg.max_new_tokens, PENALTIES)
    assert tokens != reference_greedy(model, p, cfg.max_new_tokens)  # the penalties did change something


def test_same_seed_same_tokens_other_seed_different(model, tokenizer):
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    first, _, _ = run(gen, p, SAMPLING.with_overrides(seed=5))
    again, _, _ = run(gen, p, SAMPLING.with_overrides(seed=5))
    other, _, _ = run(gen, p, SAMPLING.with_overrides(seed=6))
    assert first == again and first != other
    assert first != reference_greedy(model, p, SAMPLING.max_new_tokens)


def test_stop_string_split_across_tokens(model, tokenizer):
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    _, full, events = run(gen, p, GREEDY)
    ends, pos = [], 0
    for e in events:
        pos += len(e.text)
        ends.append(pos)
    # a stop string made of the last 2 characters of one token's text and the first 2 of a later one
    k = next(i for i in range(3, len(events)) if len(events[i - 1].text) >= 2 and len(events[i].text) >= 2)
    stop = full[ends[k - 1] - 2 : ends[k - 1] + 2]
    cut = full.find(stop)
    tokens, text, stopped = run(gen, p, GREEDY.with_overrides(stop=["never appears", stop]))
    assert text == full[:cut]
    assert stopped[-1].finish_reason == "stop"
    assert [e.finish_reason for e in stopped[:-1]] == [None] * (len(stopped) - 1)
    assert ends[len(stopped) - 1] >= cut + len(stop) > ends[len(stopped) - 2]  # ends on the completing token


@pytest.mark.parametrize("seed", range(20))
def test_stop_filter_cuts_at_the_first_stop_however_the_text_is_split(seed):
    rng = random.Random(seed)
    stops = ["User:", "\n\n", "ab", "bab"]
    text = "".join(rng.choice(["a", "b", "User", ":", "\n", "x", "Use"]) for _ in range(30))
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    stop_filter, shown, stopped = StopStringFilter(stops), "", False
    for piece in pieces:
        out, stopped = stop_filter.feed(piece)
        shown += out
        if stopped:
            break
    if not stopped:
        shown += stop_filter.flush()
    assert shown == expected and stopped == bool(hits)


def test_eos_ends_the_reply_and_releases_held_text(model, tokenizer):
    p = prompt(tokenizer)
    greedy, full, _ = run(generator(model, tokenizer), p, GREEDY)
    k = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])
    tokens, text, events = run(generator(model, tokenizer, eos_ids=[999999, greedy[k]]), p, GREEDY)
    assert tokens == greedy[: k + 1]
    assert events[-1].finish_reason == "eos"
    assert text == visible_text(tokenizer, p + greedy[:k])[len(visible_text(tokenizer, p)):]


def test_length_is_capped_by_the_context(model, tokenizer):
    gen = generator(model, tokenizer)
    long_prompt = (prompt(tokenizer) * 10)[: CONTEXT - 4]
    tokens, _, events = run(gen, long_prompt, GREEDY)
    assert len(tokens) == 4 and events[-1].finish_reason == "context"  # issue 15: not "length" (the budget's)
    tokens, _, _ = run(gen, long_prompt + [5, 6, 7], GREEDY)
    assert len(tokens) == 1
    with pytest.raises(TalisError, match=f"is {CONTEXT + 2} tokens, 3 too many"):
        gen.stream((prompt(tokenizer) * 10)[: CONTEXT + 2], GREEDY)
    with pytest.raises(TalisError, match="empty"):
        gen.stream([], GREEDY)
    with pytest.raises(UsageError):
        gen.stream_batch([], GREEDY)


@pytest.mark.parametrize("cfg", [GREEDY, GREEDY.with_overrides(**PENALTIES)], ids=["plain", "penalties"])
def test_batch_of_different_lengths_equals_each_prompt_alone(model, tokenizer, cfg):
    prompts = [prompt(tokenizer, t) for t in ("And", "In the beginning God created the heaven", "Let there be")]
    assert len({len(p) for p in prompts}) == 3
    alone = [run(generator(model, tokenizer), p, cfg)[:2] for p in prompts]
    gen = generator(model, tokenizer)
    events = list(gen.stream_batch(prompts, cfg))
    for i, (tokens, text) in enumerate(alone):
        mine = [e for e in events if e.index == i]
        assert [e.token_ids[0] for e in mine] == tokens
        assert "".join(e.text for e in mine) == text
    assert gen.last_stats.prompt_tokens == sum(map(len, prompts))
    assert gen.last_stats.new_tokens == len(events)


def test_finished_rows_stop_producing(model, tokenizer):
    prompts = [prompt(tokenizer, "And"), prompt(tokenizer, "Let there be light")]
    first, _, _ = run(generator(model, tokenizer), prompts[0], GREEDY)
    k = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    gen = generator(model, tokenizer, eos_ids=[first[k]])
    events = list(gen.stream_batch(prompts, GREEDY))
    row0 = [e for e in events if e.index == 0]
    assert [e.token_ids[0] for e in row0] == first[: k + 1] and row0[-1].finish_reason == "eos"
    last_of_row0 = events.index(row0[-1])
    rest = events[last_of_row0 + 1 :]
    assert rest and all(e.index == 1 for e in rest)


def test_closing_the_stream_keeps_stats_and_the_generator_usable(model, tokenizer):
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    stream = gen.stream(p, GREEDY)
    taken = [next(stream) for _ in range(3)]
    stream.close()
    stats = gen.last_stats
    assert stats.new_tokens == 3 and stats.prompt_tokens == len(p)
    assert 0 < stats.prefill_s <= stats.first_token_s and stats.decode_s > 0
    tokens, _, _ = run(gen, p, GREEDY)
    assert tokens[:3] == [e.token_ids[0] for e in taken]
    assert tokens == reference_greedy(model, p, GREEDY.max_new_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_greedy_and_seeded_sampling(tokenizer):
    model = build_model(len(tokenizer), device="cuda", dtype=torch.float32)
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    tokens, _, _ = run(gen, p, GREEDY)
    assert tokens == reference_greedy(model, p, GREEDY.max_new_tokens)
    first, _, _ = run(gen, p, SAMPLING.with_overrides(seed=5, **PENALTIES))
    again, _, _ = run(gen, p, SAMPLING.with_overrides(seed=5, **PENALTIES))
    assert first == again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_queued_ahead_end_close_and_reuse_like_plain_steps(tokenizer):
    """On CUDA each step is queued before the previous token is handed out (talis_cli.step_queue): an EOS, a
    stream closed early and the prefix reuse that follows must behave as if nothing ran ahead."""
    model = build_model(len(tokenizer), device="cuda", dtype=torch.float32)
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    greedy, _, _ = run(gen, p, GREEDY)
    assert greedy == reference_greedy(model, p, GREEDY.max_new_tokens)
    stats = gen.last_stats
    assert stats.new_tokens == GREEDY.max_new_tokens and 0 < stats.decode_s
    k = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])
    tokens, _, events = run(generator(model, tokenizer, eos_ids=[greedy[k]]), p, GREEDY)
    assert tokens == greedy[: k + 1] and events[-1].finish_reason == "eos"
    stream = gen.stream(p, GREEDY)
    taken = [next(stream).token_ids[0] for _ in range(3)]
    stream.close()  # a fourth step was already queued
    follow_up = p + taken + prompt(tokenizer, " and")
    tokens, _, _ = run(gen, follow_up, GREEDY)
    assert gen.last_stats.reused_tokens == len(p) + 2  # the slots of the streamed tokens whose steps ran
    assert tokens == reference_greedy(model, follow_up, GREEDY.max_new_tokens)


# ---------------------------------------------------------------- seeds per prompt (issue 15 kind 11)


def test_each_prompt_draws_the_same_tokens_in_any_batch(model, tokenizer):
    """A row's noise depends only on (seed, prompt index): alone, in pairs or all together, the text is the same."""
    gen = generator(model, tokenizer)
    texts = ["And God said", "Let there be light", "The quick brown fox", "In the beginning God", "A second line."]
    prompts = [tokenizer.encode(t) for t in texts]
    cfg = SAMPLING.with_overrides(seed=11, max_new_tokens=12)

    def generate(batch_size):
        tokens = [[] for _ in prompts]
        for start in range(0, len(prompts), batch_size):
            indices = list(range(start, min(start + batch_size, len(prompts))))
            for e in gen.stream_batch([prompts[i] for i in indices], cfg, prompt_indices=indices):
                tokens[indices[e.index]] += e.token_ids
        return tokens

    alone = generate(1)
    assert generate(2) == alone and generate(5) == alone
    assert alone[0] == run(gen, prompts[0], cfg)[0]  # prompt 0 draws with the seed itself, as a single prompt does
    assert len({tuple(t) for t in alone}) == len(texts)
    assert alone != generate_with(gen, prompts, cfg.with_overrides(seed=12))


def generate_with(gen, prompts, cfg):
    tokens = [[] for _ in prompts]
    for e in gen.stream_batch(prompts, cfg):
        tokens[e.index] += e.token_ids
    return tokens


def test_row_seeds_are_the_seed_for_prompt_0_and_distinct_in_range():
    from talis_cli.sampling import row_seed

    assert row_seed(7, 0) == 7 and row_seed(2**64 - 1, 0) == 2**64 - 1
    seeds = {row_seed(s, i) for s in (0, 1, 2**64 - 1) for i in range(1, 200)}
    assert len(seeds) == 3 * 199 and all(0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_an_infinite_temperature_or_penalty_is_out_of_range(name):
    """An infinite temperature samples uniformly at random, an infinite penalty zeroes logits: neither is a setting
    (a float flag or a server's JSON body could give one)."""
    with pytest.raises(UsageError, match=f"^{name} = inf is out of range: allowed .*, finite$"):
        GenerationConfig().with_overrides(**{name: float("inf")})


@pytest.mark.parametrize("seed, message", [(2**64, "seed = 18446744073709551616 is out of range"),
                                           (-2, "seed = -2 is out of range"), (1.5, "seed = 1.5 is out of range")])
def test_seeds_outside_64_bits_are_usage_errors(seed, message):
    with pytest.raises(UsageError, match=message):
        GenerationConfig(seed=seed).validate()


def test_seed_minus_one_means_a_fresh_seed(model, tokenizer):
    assert GenerationConfig(seed=-1).validate().seed is None
    gen, p = generator(model, tokenizer), prompt(tokenizer)
    cfg = SAMPLING.with_overrides(seed=-1)
    assert len({tuple(run(gen, p, cfg)[0]) for _ in range(4)}) > 1


# ---------------------------------------------------------------- a budget ending inside a character (kind 12)


def chain_model(tokenizer, chain):
    """A model whose greedy next token after chain[i] is chain[i + 1]: the blocks add nothing to the residual
    stream, and lm_head's row of chain[i + 1] is chain[i]'s embedding."""
    model = build_model(len(tokenizer), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for current, following in zip(chain, chain[1:]):
            model.lm_head.weight[following] = model.model.embed_tokens.weight[current] * 10
    return model


def test_a_budget_that_ends_inside_a_character_ends_with_one_replacement_char():
    from test_detokenize import sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer()
    p = tokenizer.encode("And God said", add_special_tokens=True)
    emoji = tokenizer.encode("😀", add_special_tokens=False)[-4:]  # <0xF0> <0x9F> <0x98> <0x80>
    assert [tokenizer.convert_ids_to_tokens(t) for t in emoji] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    gen = generator(chain_model(tokenizer, [p[-1]] + emoji), tokenizer)
    tokens, text, events = run(gen, p, GREEDY.with_overrides(max_new_tokens=3))
    assert tokens == emoji[:3]
    assert text == "\ufffd" and events[-1].finish_reason == "length"
    _, whole, _ = run(gen, p, GREEDY.with_overrides(max_new_tokens=4))
    assert whole == "😀"
