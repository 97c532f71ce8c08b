"""The background warm-up of `talis chat` (talis_cli/warm_up.py) on the CPU, with recording stand-ins for the GPU's
fast prefill and CUDA-graph decode step: what it warms, that the first reply waits for it (and says so in its
time to first token), that it leaves no stale prefix behind, and that a failure costs one line, not the chat."""

import time
from types import SimpleNamespace

import pytest

from talis_cli.fast_prefill import PrefillRunner
from talis_cli.generation import GenerationConfig, Generator
from talis_cli.repl.session import ChatSession
from talis_cli.warm_up import WARM_PREFILL_LENGTHS, BackgroundWarmUp
from tests.test_detokenize import byte_level_tokenizer
from tests.test_generation import CONTEXT, build_model

GREEDY = GenerationConfig(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer))


class Prefill:
    """fast_prefill.PrefillRunner on the CPU, logging each prefill (tokens, start slot, cache row)."""

    def __init__(self, model):
        self.runner, self.calls = PrefillRunner(model), []

    def __call__(self, tokens, start_pos=0, cache_row=None, last_only=True):
        self.calls.append((tokens.shape[1], start_pos, cache_row))
        return self.runner(tokens, start_pos, cache_row=cache_row, last_only=last_only)


class Decode:
    """The CUDA-graph decode runner's interface, eagerly; capture_first logs, then sleeps or fails as told."""

    def __init__(self, model, sleep=0.0, fail=None):
        self.model, self.sleep, self.fail, self.captures = model, sleep, fail, []

    def __call__(self, tokens, pos, pad_lens=None):
        return self.model(tokens, start_pos=pos, pad_lens=pad_lens)[:, -1]

    def capture_first(self, batch=1, every=False):
        self.captures.append((batch, every))
        time.sleep(self.sleep)
        if self.fail:
            raise self.fail


def texts(gen, prompt):
    return [e.text for e in gen.stream(prompt, GREEDY)]


def test_nothing_to_warm_without_a_fast_path(model, tokenizer):
    gen = Generator(model, tokenizer, (), CONTEXT)  # a CPU's generator: no fast prefill, no graphs
    warm = BackgroundWarmUp(gen)
    assert not warm.needed
    assert warm.start().wait() == 0.0 and warm.seconds == 0.0 and warm.error is None


def test_it_prefills_each_length_and_captures_every_decode_bucket_then_leaves_no_prefix(model, tokenizer):
    prompt = tokenizer.encode("And God said")
    expected = texts(Generator(model, tokenizer, (), CONTEXT), prompt)
    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill, gen.fast_decode = Prefill(model), Decode(model)
    gen._in_cache = (model.cache_version, [1, 2, 3])  # what a row held before: the warm-up overwrites it
    warm = BackgroundWarmUp(gen).start()
    warm.wait()
    lengths = [n for n in WARM_PREFILL_LENGTHS if n < CONTEXT]
    assert gen.prefill.calls == [(n, 0, 0) for n in lengths] + [(2, lengths[0], 0)]
    assert gen.fast_decode.captures == [(1, True)]
    assert warm.error is None and warm.seconds > 0 and gen._in_cache is None
    gen.prefill.calls.clear()
    assert texts(gen, prompt) == expected
    assert gen.prefill.calls == [(len(prompt), 0, None)]  # nothing of the throwaway prompts reused


def test_the_first_reply_waits_for_it_and_counts_the_wait_in_its_first_token(model, tokenizer):
    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill, gen.fast_decode = Prefill(model), Decode(model, sleep=0.4)
    session = ChatSession(SimpleNamespace(tokenizer=tokenizer, generator=gen), GREEDY, "raw",
                          warm_up=BackgroundWarmUp(gen).start())
    prompt = tokenizer.encode("And God said")
    first = session.reply(prompt, lambda text: None)
    assert len(gen.prefill.calls) > 1 and gen.fast_decode.captures == [(1, True)]  # warmed before it began
    assert first.stats.first_token_s >= 0.3  # most of the 0.4 s capture was still running when it asked
    second = session.reply(prompt, lambda text: None)
    assert second.text == first.text and second.stats.first_token_s < 0.3


def test_a_failed_warm_up_says_so_in_one_line_and_the_chat_goes_on(model, tokenizer, capsys):
    prompt = tokenizer.encode("And God said")
    expected = texts(Generator(model, tokenizer, (), CONTEXT), prompt)
    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill, gen.fast_decode = Prefill(model), Decode(model, fail=RuntimeError("CUDA out of memory"))
    warm = BackgroundWarmUp(gen).start()
    session = ChatSession(SimpleNamespace(tokenizer=tokenizer, generator=gen), GREEDY, "raw", warm_up=warm)
    reply = session.reply(prompt, lambda text: None)
    assert warm.error == "RuntimeError: CUDA out of memory"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["talis: the warm-up stopped (RuntimeError: CUDA out of memory); kernels compile and graphs are "
                   "captured on first use instead"]
    assert "".join(texts(Generator(model, tokenizer, (), CONTEXT), prompt)) == reply.text == "".join(expected)
