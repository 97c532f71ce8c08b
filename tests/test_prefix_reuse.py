"""A chat's next prompt starts with the previous prompt and reply: the generator computes only the new part,
and the tokens are exactly those of a generation from scratch."""

from talis_cli.generation import GenerationConfig, Generator
from tests.test_detokenize import byte_level_tokenizer
from tests.test_generation import GREEDY, build_model, prompt, reference_greedy, run


def setup():
    tokenizer = byte_level_tokenizer()
    model = build_model(len(tokenizer))
    return model, tokenizer, Generator(model, tokenizer, (), 48)


def test_a_continued_conversation_reuses_the_cache_and_matches_a_fresh_run():
    model, tokenizer, gen = setup()
    first = prompt(tokenizer, "And God said")
    reply, _, _ = run(gen, first, GenerationConfig(temperature=0, max_new_tokens=8))
    follow_up = first + reply + prompt(tokenizer, " and")
    tokens, _, _ = run(gen, follow_up, GREEDY)
    # every token but the reply's last was fed through the model, so only that one and the new text are computed
    assert gen.last_stats.reused_tokens == len(first) + len(reply) - 1
    assert tokens == reference_greedy(model, follow_up, len(tokens))


def test_a_changed_prefix_and_an_interrupted_reply_are_handled():
    model, tokenizer, gen = setup()
    first = prompt(tokenizer, "In the beginning God")
    stream = gen.stream(first, GREEDY)
    fed = [next(stream).token_ids[0] for _ in range(4)]
    stream.close()  # Ctrl-C after four tokens: three were fed back through the model
    again = first + fed + prompt(tokenizer, "!")
    tokens, _, _ = run(gen, again, GREEDY)
    assert gen.last_stats.reused_tokens == len(first) + 3
    assert tokens == reference_greedy(model, again, len(tokens))
    # the reference cleared the cache: nothing may be reused now
    other = prompt(tokenizer, "In the end")
    tokens, _, _ = run(gen, other, GREEDY)
    assert gen.last_stats.reused_tokens == 0
    edited = other[:2] + prompt(tokenizer, "XYZ")  # the conversation was edited after two tokens
    tokens, _, _ = run(gen, edited, GREEDY)
    assert gen.last_stats.reused_tokens == 2
    assert tokens == reference_greedy(model, edited, len(tokens))


def test_a_stale_stream_closed_late_does_not_claim_the_cache():
    model, tokenizer, gen = setup()
    a, b = prompt(tokenizer, "Blessed are the meek"), prompt(tokenizer, "Vanity of vanities")
    old = gen.stream(a, GREEDY)
    next(old)
    tokens_b, _, _ = run(gen, b, GREEDY)
    old.close()  # finishes after b's generation: must not overwrite what the cache holds
    follow_up = a + prompt(tokenizer, " and")
    tokens, _, _ = run(gen, follow_up, GREEDY)
    assert gen.last_stats.reused_tokens == 0
    assert tokens == reference_greedy(model, follow_up, len(tokens))
