"""The continuous-batching scheduler on the CPU: requests that join, leave, are cancelled, wait in a bounded queue,
reuse a cached prefix and drain at stop give exactly the events Generator.stream gives each request alone."""

import threading

import pytest
import torch

from talis_cli.errors import TalisError, UsageError
from talis_cli.generation import GenerationConfig, Generator
from talis_cli.scheduler import Draining, QueueFull, Scheduler
from tests.test_detokenize import byte_level_tokenizer
from tests.test_generation import CONTEXT, build_model

GREEDY = GenerationConfig(temperature=0, max_new_tokens=12)
SEEDED = GenerationConfig(temperature=1.0, top_k=20, top_p=0.9, min_p=0.0, max_new_tokens=12, seed=11,
                          repetition_penalty=1.3, repetition_window=5, frequency_penalty=0.4, presence_penalty=0.2)
UNPENALIZED = GenerationConfig(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05, max_new_tokens=12, seed=3)
# on CUDA each decode step is read one iteration after its launch; on the CPU it can be asked for, to test it
PIPELINED = pytest.mark.parametrize("pipelined", [False, True], ids=["direct", "pipelined"])


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer))  # float64: batching cannot flip an argmax


def shape(events):
    return [(e.index, e.text, e.token_ids, e.finish_reason) for e in events]


def alone(model, tokenizer, prompt, cfg, index=0, eos_ids=()):
    """The events of `prompt` generated alone by a Generator (the reference); a scheduler's events carry the
    request's prompt index."""
    gen = Generator(model, tokenizer, eos_ids, CONTEXT)
    return [(index, *e[1:]) for e in shape(gen.stream_batch([prompt], cfg, prompt_indices=[index]))]


def drain(scheduler, requests, limit=500):
    """Step until every request is done; events per request."""
    seen = {r.id: [] for r in requests}
    for _ in range(limit):
        if all(r.done for r in requests):
            break
        scheduler.step()
    for r in requests:
        seen[r.id] = shape(r.events(timeout=0))
    return seen


@PIPELINED
def test_requests_that_join_while_others_decode_give_what_they_give_alone(model, tokenizer, pipelined):
    prompts = [tokenizer.encode(t) for t in ("And God said", "In the beginning God created the heaven", "Let")]
    cfgs = [GREEDY, SEEDED, UNPENALIZED]
    expected = [alone(model, tokenizer, p, c, index=i) for i, (p, c) in enumerate(zip(prompts, cfgs))]
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=4, prefill_chunk=4,
                          pipelined=pipelined)
    first = scheduler.submit(prompts[0], GREEDY)
    for _ in range(3):
        scheduler.step()
    assert scheduler.running == 1
    later = [scheduler.submit(prompts[i], cfgs[i], prompt_index=i) for i in (1, 2)]
    scheduler.step()
    assert scheduler.running == 3 and scheduler.queue_depth == 0
    got = drain(scheduler, [first, *later])
    assert [got[r.id] for r in (first, *later)] == expected
    assert first.stats.new_tokens == 12 and first.stats.finish_reason == "length"
    assert 0 < first.stats.first_token_s <= first.stats.first_token_s + first.stats.decode_s
    assert scheduler.running == 0 and not scheduler.step()


def test_pipelined_steps_are_launched_before_the_last_is_read_and_fed_on_the_device(model, tokenizer, monkeypatch):
    """Pipelined, each decode step is launched before the previous step's tokens are read, fed those tokens where
    they are (only the rows that go on: a row between two others ends first); replies are what they are alone."""
    from talis_cli.step_queue import QueuedStep

    log = []

    class Recording:  # the CUDA-graph runner's decode_rows, eagerly, logging what it is fed
        def decode_rows(self, tokens, slots, rows, first=None):
            log.append(("launch", len(tokens), 0 if first is None else len(first)))
            if first is not None:
                tokens = torch.cat([first, tokens[len(first):]])
            return model.decode_rows(tokens, slots, rows)

    prompts = [tokenizer.encode(t) for t in ("And God said", "Let", "In the beginning")]
    cfgs = [GenerationConfig(temperature=0, max_new_tokens=n) for n in (8, 3, 8)]
    expected = [alone(model, tokenizer, p, c, index=i) for i, (p, c) in enumerate(zip(prompts, cfgs))]
    read = QueuedStep.ids
    monkeypatch.setattr(QueuedStep, "ids", lambda step: log.append(("read",)) or read(step))
    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.fast_decode = Recording()
    scheduler = Scheduler(gen, max_batch=3, pipelined=True)
    requests = [scheduler.submit(p, c, prompt_index=i) for i, (p, c) in enumerate(zip(prompts, cfgs))]
    got = drain(scheduler, requests)
    assert [got[r.id] for r in requests] == expected
    # the prefill draws each first token; 7 decode steps draw the rest: 3 rows twice, then the 2 that go on
    assert log == ([("launch", 3, 0), ("launch", 3, 3), ("read",)] + [("launch", 2, 2), ("read",)] * 5
                   + [("read",)])


def test_a_finished_row_is_reused_and_a_waiting_request_takes_it(model, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("And God said", "the waters", "Let there be light")]
    short = GenerationConfig(temperature=0, max_new_tokens=3)
    expected = [alone(model, tokenizer, p, c) for p, c in zip(prompts, (short, GREEDY, GREEDY))]
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=2)
    requests = [scheduler.submit(p, c) for p, c in zip(prompts, (short, GREEDY, GREEDY))]
    scheduler.step()
    assert (scheduler.running, scheduler.queue_depth) == (2, 1)
    steps = 1
    while not requests[0].done:
        scheduler.step()
        steps += 1
    assert steps == 2 and scheduler.running == 1  # the 3-token request left after its prefill and two decodes
    scheduler.step()
    assert (scheduler.running, scheduler.queue_depth) == (2, 0)  # the waiting one took the freed row at once
    got = drain(scheduler, requests)
    assert [got[r.id] for r in requests] == expected


@PIPELINED
def test_cancel_mid_decode_ends_with_cancelled_frees_the_row_and_leaves_the_others_alone(model, tokenizer, pipelined):
    a, b = tokenizer.encode("And God said"), tokenizer.encode("In the beginning")
    expected_b = alone(model, tokenizer, b, SEEDED, index=1)
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=2, pipelined=pipelined)
    ra, rb = scheduler.submit(a, GREEDY), scheduler.submit(b, SEEDED, prompt_index=1)
    for _ in range(4):  # the first step prefills and decodes once: five tokens (pipelined: the decode is read later)
        scheduler.step()
    n = 4 if pipelined else 5
    ra.cancel()
    scheduler.step()
    assert scheduler.running == 1 and ra.done
    events = shape(ra.events(timeout=0))
    assert events[-1] == (0, "", [], "cancelled") and len(events) == n + 1
    assert events[:n] == alone(model, tokenizer, a, GREEDY)[:n]
    assert ra.stats.finish_reason == "cancelled" and ra.stats.new_tokens == n
    rc = scheduler.submit(a, GREEDY)  # takes the freed row: the scheduler has two
    scheduler.step()
    assert scheduler.running == 2
    got = drain(scheduler, [rb, rc])
    assert got[rb.id] == expected_b and got[rc.id] == alone(model, tokenizer, a, GREEDY)
    waiting = scheduler.submit(a, GREEDY)
    waiting.cancel()  # cancelled before it ever ran
    scheduler.step()
    assert shape(waiting.events(timeout=0)) == [(0, "", [], "cancelled")] and scheduler.queue_depth == 0


def test_a_full_queue_and_bad_requests_are_refused_at_submit(model, tokenizer):
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=1, max_queue=2)
    p = tokenizer.encode("And God said")
    first = scheduler.submit(p, GREEDY)  # takes the free row at the next step: it does not count as waiting
    scheduler.submit(p, GREEDY)
    scheduler.submit(p, GREEDY)
    full = "^2 requests are already waiting for a row \\(the most is 2\\); try again later$"
    with pytest.raises(QueueFull, match=full):
        scheduler.submit(p, GREEDY)
    scheduler.step()  # the first is admitted; two still wait for its row
    with pytest.raises(QueueFull, match=full):
        scheduler.submit(p, GREEDY)
    while not first.done:
        scheduler.step()
    scheduler.submit(p, GREEDY)  # its row is free: one place more
    too_long = list(range(3, 3 + CONTEXT))
    with pytest.raises(TalisError, match=f"^the prompt is {CONTEXT} tokens, 1 too many for a context of {CONTEXT} "
                                         f"\\(room for {CONTEXT - 1} plus one new token\\)"):
        scheduler.submit(too_long, GREEDY)
    with pytest.raises(TalisError, match="^the prompt is empty"):
        scheduler.submit([], GREEDY)
    with pytest.raises(UsageError, match="^temperature = -1.0 is out of range"):
        scheduler.submit(p, GenerationConfig(temperature=-1.0))


@PIPELINED
def test_a_continued_conversation_reuses_its_rows_keys_and_values(model, tokenizer, pipelined):
    gen = Generator(model, tokenizer, (), CONTEXT)
    scheduler = Scheduler(gen, max_batch=3, pipelined=pipelined)
    first = tokenizer.encode("And God said")
    other = scheduler.submit(tokenizer.encode("Let there be"), GREEDY)  # takes a row too
    r1 = scheduler.submit(first, GenerationConfig(temperature=0, max_new_tokens=6))
    reply = [t for e in drain(scheduler, [other, r1])[r1.id] for t in e[2]]
    follow_up = first + reply + tokenizer.encode(" and the")
    r2 = scheduler.submit(follow_up, SEEDED)
    got = drain(scheduler, [r2])[r2.id]
    # every token of the reply but the last went through the model: only that one and the new text are computed
    assert r2.stats.reused_tokens == len(first) + len(reply) - 1
    assert r2.stats.prompt_tokens == len(follow_up)
    assert got == alone(model, tokenizer, follow_up, SEEDED)
    r3 = scheduler.submit(first[:1] + tokenizer.encode(" x"), GREEDY)  # shares one token with two rows
    drain(scheduler, [r3])
    assert r3.stats.reused_tokens == 1


@PIPELINED
def test_stop_strings_and_eos_end_rows_as_the_generator_ends_them(model, tokenizer, pipelined):
    p = tokenizer.encode("In the beginning God")
    text = "".join(e[1] for e in alone(model, tokenizer, p, GREEDY))
    stop = GenerationConfig(temperature=0, max_new_tokens=12, stop=(text[3:5],))
    free_tokens = [e[2][0] for e in alone(model, tokenizer, p, GREEDY)]
    eos = (free_tokens[5],)
    scheduler = Scheduler(Generator(model, tokenizer, eos, CONTEXT), max_batch=2, pipelined=pipelined)
    a, b = scheduler.submit(p, stop), scheduler.submit(p, GREEDY)
    got = drain(scheduler, [a, b])
    assert got[a.id] == alone(model, tokenizer, p, stop, eos_ids=eos) and got[a.id][-1][3] == "stop"
    assert got[b.id] == alone(model, tokenizer, p, GREEDY, eos_ids=eos) and got[b.id][-1][3] == "eos"
    near_end = list(range(3, 3 + CONTEXT - 3))  # room for 3 tokens: the reply ends with "context"
    c = scheduler.submit(near_end, GREEDY)
    assert drain(scheduler, [c])[c.id] == alone(model, tokenizer, near_end, GREEDY, eos_ids=eos)
    assert c.stats.finish_reason == "context" and c.stats.new_tokens == 3


@PIPELINED
def test_the_thread_serves_listeners_and_stop_drains_then_refuses(model, tokenizer, pipelined):
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=2, pipelined=pipelined)
    scheduler.start()
    seen, finished = [], threading.Event()

    def listener(request, event):
        seen.append(event)
        if event.finish_reason:
            finished.set()

    p = tokenizer.encode("And God said")
    scheduler.submit(p, GREEDY, listener=listener)
    streamed = scheduler.submit(p, SEEDED, prompt_index=2)
    assert shape(streamed.events(timeout=30)) == alone(model, tokenizer, p, SEEDED, index=2)
    assert finished.wait(30) and shape(seen) == alone(model, tokenizer, p, GREEDY)
    long_run = scheduler.submit(p, GenerationConfig(temperature=0, max_new_tokens=CONTEXT))
    scheduler.stop(deadline_s=0.0)  # no time left: the running request is cancelled
    assert long_run.done and shape(long_run.events(timeout=0))[-1] == (0, "", [], "cancelled")
    with pytest.raises(Draining, match="^the server is shutting down"):
        scheduler.submit(p, GREEDY)
    quiet = Scheduler(Generator(model, tokenizer, (), CONTEXT), pipelined=pipelined)
    r = quiet.submit(p, GREEDY)
    with pytest.raises(TimeoutError):
        next(r.events(timeout=0.01))
    quiet.stop(deadline_s=30)  # stepped by the caller: the accepted request finishes
    assert shape(r.events(timeout=0)) == alone(model, tokenizer, p, GREEDY)


def test_a_row_that_joins_late_draws_transformers_greedy_tokens(tmp_path):
    """Mistral-style GQA + sliding window: a request that joins while another is 20 tokens in gets
    transformers' own greedy continuation, and so does the one already running."""
    from transformers import MistralConfig, MistralForCausalLM

    from talis_cli.tokenizer import load_tokenizer
    from tests.hf_parity import hf_random, random_tokens, talis_model

    hf = hf_random(MistralConfig, MistralForCausalLM, 2, sliding_window=8, num_key_value_heads=2)
    model = talis_model(hf, tmp_path, max_seq_len=96)
    scheduler = Scheduler(Generator(model, load_tokenizer(tmp_path), [], 96), max_batch=3, prefill_chunk=5,
                          pipelined=True)
    prompts = [random_tokens(1, n, seed=s)[0].tolist() for n, s in ((6, 4), (17, 5))]
    cfg = GenerationConfig(temperature=0, max_new_tokens=30)
    first = scheduler.submit(prompts[0], cfg)
    for _ in range(20):
        scheduler.step()
    late = scheduler.submit(prompts[1], cfg)
    got = drain(scheduler, [first, late])
    for request, p in ((first, prompts[0]), (late, prompts[1])):
        theirs = hf.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert [e[2][0] for e in got[request.id]] == theirs[0, len(p):].tolist()


def test_prefill_goes_through_the_generators_fast_prefill_when_it_has_one(model, tokenizer):
    """On GPUs the generator carries a fast prefill (fast_prefill.PrefillRunner: tokens [1, T], start_pos,
    cache_row -> logits [1, 1, vocab]); the scheduler prefills each chunk through it, into the request's row."""
    gen = Generator(model, tokenizer, (), CONTEXT)
    calls = []

    def prefill(tokens, start_pos, cache_row=None, last_only=True):
        calls.append((tokens.shape[1], start_pos, cache_row))
        return model(tokens, start_pos=start_pos, last_only=True, cache_row=cache_row)

    gen.prefill = prefill
    scheduler = Scheduler(gen, max_batch=2, prefill_chunk=8)
    p = tokenizer.encode("In the beginning God created the heaven and the earth")
    first = tokenizer.encode("Let")
    other = scheduler.submit(first, GREEDY)
    scheduler.step()
    r = scheduler.submit(p, SEEDED)
    got = drain(scheduler, [other, r])
    assert got[r.id] == alone(model, tokenizer, p, SEEDED)
    assert calls == [(len(first), 0, 0)] + [(min(8, len(p) - s), s, 1) for s in range(0, len(p), 8)]


def test_newcomers_of_one_step_are_prefilled_in_one_forward(model, tokenizer):
    """With the fast prefill (fast_prefill.PrefillRunner, here on the CPU under the Triton interpreter), requests
    that arrive together are prefilled as segments of one forward, at most prefill_chunk tokens a step (the third
    prompt is cut and finished in the next step); each gives its text alone."""
    from talis_cli.fast_prefill import PrefillRunner

    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill = runner = PrefillRunner(model)
    calls, segments = [], runner.prefill_segments

    def spy(parts):
        calls.append([(len(ids), start, row) for ids, start, row in parts])
        return segments(parts)

    runner.prefill_segments = spy
    prompts = [tokenizer.encode(text) for text in ("In the beginning God created", "And the earth was without form",
                                                   "Let there be light: and there was light")]
    budget = len(prompts[0]) + len(prompts[1]) + 3
    scheduler = Scheduler(gen, max_batch=3, prefill_chunk=budget)
    requests = [scheduler.submit(p, GREEDY, prompt_index=i) for i, p in enumerate(prompts)]
    got = drain(scheduler, requests)
    for i, (request, p) in enumerate(zip(requests, prompts)):
        assert got[request.id] == alone(model, tokenizer, p, GREEDY, index=i)
    assert calls[0] == [(len(prompts[0]), 0, 0), (len(prompts[1]), 0, 1), (3, 0, 2)]
    assert len(calls) == 1  # the third prompt's rest was one segment: one call each, through __call__
    assert (scheduler.prefill_forwards, scheduler.prefill_tokens) == (2, sum(map(len, prompts)))


def test_a_failure_while_admitting_ends_that_request_with_an_error_and_the_thread_serves_on(model, tokenizer):
    """A request taken off the queue whose admission fails (say, the cache cannot be allocated) gets its last
    event, finish reason "error", instead of leaving its reader waiting forever."""
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=2)
    scheduler.start()
    real, failures = scheduler._ensure_cache, ["out of memory"]

    def ensure_cache_failing_once():
        if failures:
            raise RuntimeError(failures.pop())
        real()

    scheduler._ensure_cache = ensure_cache_failing_once
    p = tokenizer.encode("And God said")
    try:
        failed = scheduler.submit(p, GREEDY)
        assert shape(failed.events(timeout=30)) == [(0, "", [], "error")]
        assert failed.done and failed.error == "RuntimeError: out of memory"
        after = scheduler.submit(p, GREEDY)
        assert shape(after.events(timeout=30)) == alone(model, tokenizer, p, GREEDY)
    finally:
        scheduler.stop(deadline_s=0)


def test_max_queue_0_runs_requests_that_find_a_free_row(model, tokenizer):
    """max_queue counts requests that wait for a row: with 0, a request runs when a row is free and is refused
    only when every row is taken."""
    scheduler = Scheduler(Generator(model, tokenizer, (), CONTEXT), max_batch=2, max_queue=0)
    p = tokenizer.encode("And God said")
    a, b = scheduler.submit(p, GREEDY), scheduler.submit(p, GREEDY, prompt_index=1)
    with pytest.raises(QueueFull, match="^0 requests are already waiting for a row \\(the most is 0\\)"):
        scheduler.submit(p, GREEDY)
    seen = drain(scheduler, [a, b])
    assert seen[a.id] == alone(model, tokenizer, p, GREEDY) and seen[b.id] == alone(model, tokenizer, p, GREEDY, 1)


def test_warm_up_without_a_fast_prefill_needs_no_triton(model, tokenizer, monkeypatch):
    """On a CPU-only install (no Triton) the generator has no fast prefill: warm_up() sets up the cache and
    imports nothing of the GPU path (talis serve printed an ImportError traceback at every start there)."""
    import sys

    monkeypatch.setitem(sys.modules, "talis_cli.fast_prefill", None)  # importing it now raises ImportError
    gen = Generator(model, tokenizer, (), CONTEXT)
    assert gen.prefill is None
    scheduler = Scheduler(gen, max_batch=2)
    scheduler.warm_up()
    prompt = tokenizer.encode("And God said")
    request = scheduler.submit(prompt, GREEDY)
    assert drain(scheduler, [request])[request.id] == alone(model, tokenizer, prompt, GREEDY)


def test_warm_up_prefills_each_tile_height_into_the_spare_row_and_leaves_rows_clean(model, tokenizer):
    """warm_up() runs a throwaway prefill of each WARM_PREFILL_LENGTHS length within the context (the kernels of
    every tile height compile before the first request), one continuing a cached prefix and one packed, into the
    spare row (and row 0); the requests after it reuse nothing of those and give their text alone."""
    from talis_cli.fast_prefill import PrefillRunner
    from talis_cli.warm_up import WARM_PREFILL_LENGTHS

    runner, calls = PrefillRunner(model), []

    class Spy:
        def __call__(self, tokens, start_pos, cache_row=None, last_only=True):
            calls.append((tokens.shape[1], start_pos, cache_row))
            return runner(tokens, start_pos, cache_row=cache_row, last_only=last_only)

        def prefill_segments(self, parts):
            calls.append([(len(ids), start, row) for ids, start, row in parts])
            return runner.prefill_segments(parts)

    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill = Spy()
    scheduler = Scheduler(gen, max_batch=2)
    scheduler.warm_up()
    lengths = [n for n in WARM_PREFILL_LENGTHS if n < CONTEXT]
    assert len(lengths) >= 2
    assert calls == [(n, 0, 2) for n in lengths] + [(2, lengths[0], 2), [(lengths[1], 0, 2), (2, 0, 0)]]
    prompts = [tokenizer.encode(text) for text in ("In the beginning God created", "And the earth was")]
    requests = [scheduler.submit(p, GREEDY, prompt_index=i) for i, p in enumerate(prompts)]
    got = drain(scheduler, requests)
    for i, (request, p) in enumerate(zip(requests, prompts)):
        assert got[request.id] == alone(model, tokenizer, p, GREEDY, index=i)
        assert request.stats.reused_tokens == 0


@pytest.mark.parametrize("max_batch,prefill_chunk,context,buckets", [
    (2, 512, 1024, [16, 32, 64, 128, 256, 512]),  # every bucket
    (2, 100, 1024, [16, 32, 64, 128]),  # a step of 65..100 tokens replays the 128 bucket
    (2, 512, 40, [16, 32, 64, 128]),  # two rows' prompts of under 40 tokens: at most 80 in a step
    (1, 512, 40, [16, 32, 64]),
])
def test_warm_up_captures_every_prefill_graph_a_step_can_replay_and_no_other(model, tokenizer, max_batch,
                                                                            prefill_chunk, context, buckets):
    """Where the fast prefill replays CUDA graphs (its `capture`), warm_up() captures in the spare row the graph of
    each bucket a step's prefill can reach (at most prefill_chunk tokens, and at most the rows' contexts), so no
    request waits for a capture, and none that no step can use."""
    captured = []

    class Runner:  # what the warm-up calls of fast_prefill.PrefillRunner: only the captures are checked here
        def capture(self, bucket, row):
            captured.append((bucket, row))

        def __call__(self, tokens, start_pos, cache_row=None, last_only=True):
            return None

        def prefill_segments(self, parts):
            return None

    gen = Generator(model, tokenizer, (), context)
    gen.prefill = Runner()
    Scheduler(gen, max_batch=max_batch, prefill_chunk=prefill_chunk).warm_up()
    assert captured == [(bucket, max_batch) for bucket in buckets]


def test_warm_up_refuses_once_a_request_holds_a_row_and_fits_a_tiny_context(model, tokenizer):
    """warm_up() overwrites row 0 (and the spare row): once a request is admitted it raises, and the request goes
    on with its own text; on a context of 3 tokens it prefills only what fits (no continuation past the end)."""
    from talis_cli.fast_prefill import PrefillRunner

    gen = Generator(model, tokenizer, (), CONTEXT)
    gen.prefill = PrefillRunner(model)
    scheduler = Scheduler(gen, max_batch=2)
    prompt = tokenizer.encode("In the beginning God created")
    request = scheduler.submit(prompt, GREEDY)
    scheduler.step()
    assert scheduler.running == 1
    with pytest.raises(RuntimeError, match="before the first request"):
        scheduler.warm_up()
    assert drain(scheduler, [request])[request.id] == alone(model, tokenizer, prompt, GREEDY)

    runner, calls = PrefillRunner(model), []

    class Spy:
        def __call__(self, tokens, start_pos, cache_row=None, last_only=True):
            calls.append((tokens.shape[1], start_pos, cache_row))
            return runner(tokens, start_pos, cache_row=cache_row, last_only=last_only)

    tiny = Generator(model, tokenizer, (), 3)
    tiny.prefill = Spy()
    Scheduler(tiny, max_batch=1).warm_up()
    assert calls == [(2, 0, 1)]
