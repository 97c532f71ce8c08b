"""`talis generate --each-line`: result N on line N (issue 15 kind 10) and seeds per line (kind 11), run as users
run it, against the engine called in-process."""

import json

import pytest

from talis_cli.generation import GenerationConfig
from tests.test_cli import one_line_error, run_talis
from tests.tiny_models import hf_model, save_fp16

SAMPLED = ["--temperature", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0", "-n", "8", "--seed", "7"]
CONFIG = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=8, seed=7)
CONTEXT = 256  # tiny_config's max_position_embeddings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_fp16(hf_model(seed=5), tmp_path_factory.mktemp("oneshot_model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    from talis_cli.engine import Engine, LoadSettings

    return Engine.load(LoadSettings(model_dir=model_dir))


def engine_text(engine, line: str, line_index: int) -> str:
    """What the engine draws for one line alone, with that line's seed."""
    events = engine.generator.stream_batch([engine.encode(line)], CONFIG, prompt_indices=[line_index])
    return "".join(e.text for e in events)


def test_each_line_gives_one_line_per_input_line_whatever_the_batch_size(model_dir, engine):
    too_long = "and the evening and the morning were the first day " * 30
    lines = ["And God said", "", "the waters under the heaven", too_long, "Let there be light"]
    stdin = ("\n".join(lines) + "\n").encode()
    runs = {size: run_talis("generate", "-m", model_dir, "--each-line", *size, *SAMPLED, stdin=stdin)
            for size in ((), ("--batch-size", "1"))}
    as_json = run_talis("generate", "-m", model_dir, "--each-line", "--json", "--batch-size", "2", *SAMPLED,
                        stdin=stdin)

    over = len(engine.encode(too_long)) - (CONTEXT - 1)
    expected_errors = ["line 2 is blank; its output line is left empty",
                       f"line 4: the prompt is {len(engine.encode(too_long))} tokens, {over} too many for a context "
                       f"of {CONTEXT}"]
    texts = {i: engine_text(engine, lines[i], i) for i in (0, 2, 4)}
    assert len(set(texts.values())) == 3
    for result in [*runs.values(), as_json]:
        assert result.returncode == 1  # a line failed; the others ran
        messages = result.stderr.decode().splitlines()
        assert len(messages) == 2 and all(m.startswith("error: ") for m in messages), messages
        assert messages[0] == "error: " + expected_errors[0] and messages[1].startswith("error: " + expected_errors[1])
    one_line = {i: text.translate(str.maketrans("\r\n", "  ")) for i, text in texts.items()}
    for result in runs.values():  # default batch (all three together) and one at a time: the same text
        assert result.stdout.decode() == "".join(one_line.get(i, "") + "\n" for i in range(5))
    records = [json.loads(line) for line in as_json.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == lines
    assert [r["text"] for r in records] == [texts[0], "", texts[2], "", texts[4]]
    assert records[1]["error"] == expected_errors[0] and records[3]["error"].startswith(expected_errors[1])
    assert not any("error" in records[i] for i in (0, 2, 4)) and records[0]["generated_tokens"] == 8


@pytest.mark.parametrize("seed", ["18446744073709551616", "-2"])
def test_seeds_outside_64_bits_exit_2_with_one_line(model_dir, seed):
    result = run_talis("generate", "-m", model_dir, "-p", "And God said", "--seed", seed)
    assert result.returncode == 2 and result.stdout == b""
    assert f"seed = {seed} is out of range: allowed an integer 0..18446744073709551615, or -1 for a fresh " \
           "random seed" in one_line_error(result)


def test_seed_minus_one_draws_a_fresh_seed(model_dir, engine):
    """`--seed -1` is accepted and random (that each run draws anew: test_generation's
    test_seed_minus_one_means_a_fresh_seed); lines draw apart from each other."""
    result = run_talis("generate", "-m", model_dir, "--each-line", *SAMPLED[:-1], "-1", stdin=b"And God said\n" * 2)
    assert result.returncode == 0, result.stderr.decode()
    first, second = result.stdout.decode().splitlines()
    seeded = [engine_text(engine, "And God said", i) for i in (0, 1)]
    assert first != second and [first, second] != seeded


def test_a_fresh_seed_is_reported_and_repeats_the_run(model_dir):
    """Without a seed (or with -1) the run draws one seed, shows it (--json records, --stats), and --seed with it
    gives the same text again, line by line."""
    lines = b"And God said\nIn the beginning\nThe LORD is my shepherd\n"
    first = run_talis("generate", "-m", model_dir, "--each-line", "--json", "--batch-size", "2", *SAMPLED[:-2],
                      stdin=lines)
    assert first.returncode == 0, first.stderr.decode()
    records = [json.loads(line) for line in first.stdout.decode().splitlines()]
    seeds = {record["seed"] for record in records}
    assert len(seeds) == 1 and 0 <= next(iter(seeds)) < 2**53  # a JSON number every reader keeps exact
    again = run_talis("generate", "-m", model_dir, "--each-line", "--json", *SAMPLED[:-2], "--seed", seeds.pop(),
                      "--stats", stdin=lines)
    assert [json.loads(line)["text"] for line in again.stdout.decode().splitlines()] == [r["text"] for r in records]
    assert f"{'seed:':<22}{records[0]['seed']}" in again.stderr.decode()


def test_presets_and_config_files_check_seeds_the_same_way(tmp_path):
    from talis_cli.errors import UsageError
    from talis_cli.presets import load_generation_preset
    from talis_cli.settings import resolve_settings

    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"temperature": 1.0, "seed": 2**64}))
    with pytest.raises(UsageError, match=f"{preset}: seed = 18446744073709551616 is out of range"):
        load_generation_preset(str(preset))
    config = tmp_path / "talis.env"
    config.write_text("SEED=-1\n")
    assert resolve_settings({}, config).generation_config().seed is None  # -1: a fresh seed
    config.write_text("SEED=-5\n")
    with pytest.raises(UsageError, match="seed = -5 is out of range"):
        resolve_settings({}, config).generation_config()


class Collected:
    """A writer that keeps each prompt's tokens."""

    def __init__(self, count):
        self.tokens = [[] for _ in range(count)]

    def add(self, index, event):
        self.tokens[index] += event.token_ids

    def fail(self, index, message):
        raise AssertionError(message)

    def end_batch(self, indices, stats):
        pass


def test_a_prompt_near_the_context_end_does_not_shorten_the_others_replies(engine):
    from talis_cli.oneshot import Prompt, plan_batches, run_batches

    long_ids = engine.encode("and the evening " * 200)[:CONTEXT - 6]  # room for 6 new tokens, not 8
    prompts = [Prompt("a", engine.encode("And God said")), Prompt("b", long_ids), Prompt("c", engine.encode("Let"))]
    assert plan_batches(prompts, 8, CONTEXT - CONFIG.max_new_tokens) == [[1], [0, 2]]
    writer = Collected(3)
    run_batches(engine.generator, prompts, CONFIG, 8, writer)
    assert [len(t) for t in writer.tokens] == [8, 6, 8]
    assert writer.tokens[0] == [t for e in engine.generator.stream(prompts[0].ids, CONFIG) for t in e.token_ids]


class Ordered(Collected):
    """Collected, also noting the order in which prompts' first tokens and ends arrive."""

    def __init__(self, count):
        super().__init__(count)
        self.log, self.stats = [], {}

    def add(self, index, event):
        if not self.tokens[index]:
            self.log.append(("first", index))
        super().add(index, event)

    def end_batch(self, indices, stats):
        self.log += [("end", i) for i in indices]
        self.stats.update({i: stats for i in indices})


def test_each_line_through_the_scheduler_a_line_takes_a_freed_row_without_waiting(engine):
    """Two rows: line 2 (near the context end) finishes first and line 3 starts at once, before line 1 ends; every
    line gets the tokens it gets alone with its own seed, and its own stats."""
    from talis_cli.oneshot import Prompt, run_scheduled

    near_end = engine.encode("and the evening " * 200)[:CONTEXT - 3]  # room for 3 new tokens
    prompts = [Prompt("a", engine.encode("And God said")), Prompt("b", near_end), Prompt("c", engine.encode("Let"))]
    writer = Ordered(3)
    totals = run_scheduled(engine.generator, prompts, CONFIG, 2, writer)
    alone = [[t for e in engine.generator.stream_batch([p.ids], CONFIG, prompt_indices=[i]) for t in e.token_ids]
             for i, p in enumerate(prompts)]
    assert writer.tokens == alone and [len(t) for t in alone] == [8, 3, 8]
    assert writer.log.index(("end", 1)) < writer.log.index(("first", 2)) < writer.log.index(("end", 0))
    assert [writer.stats[i].prompt_tokens for i in range(3)] == [len(p.ids) for p in prompts]
    assert [writer.stats[i].new_tokens for i in range(3)] == [8, 3, 8]
    assert (totals.prompt_tokens, totals.new_tokens) == (sum(len(p.ids) for p in prompts), 19)
    assert totals.prefill_s > 0 and totals.decode_s > 0
