"""CUDA graphs captured lazily: the load captures the first context bucket only, a later bucket is captured on
first use or ahead of need, and the tokens equal the plain path's whichever bucket a step replays.

On the CPU the decode step runs its Triton ops under TRITON_INTERPRET=1 and a captured "graph" is the step run
again eagerly into the same output buffer (`EagerGraphDecoder`): what is checked is which buckets are captured
when, and that each replay computes the plain forward's step. The gpu tests do the same with real CUDA graphs.
"""
import pytest
import torch

from quant_kernels.fuse import fuse_model
from talis_cli import fast_decode
from talis_cli.fast_decode import CudaGraphDecoder, buckets
from talis_cli.generation import GenerationConfig, Generator
from talis_cli.tokenizer import load_tokenizer

from tests.test_fast_decode import tiny_model
from tests.tiny_models import TOKENIZER_DIR

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay() runs the step again and writes its captured outputs."""

    def __init__(self, step, capacity: int, outputs):
        self.step, self.capacity, self.outputs = step, capacity, outputs

    def replay(self) -> None:
        fresh = self.step.run(self.capacity)
        if isinstance(self.outputs, tuple):
            for have, new in zip(self.outputs, fresh):
                have.copy_(new)
        else:
            self.outputs.copy_(fresh)


class EagerGraphDecoder(CudaGraphDecoder):
    """CudaGraphDecoder with EagerGraph captures; `log` lists (slot of the call, captured capacities after it)."""

    def __init__(self, model):
        super().__init__(model)
        self.log: list[tuple[int, list[int]]] = []

    @staticmethod
    def _outputs(step, capacity):
        out = step.run(capacity)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def _capture(self, step, capacity):  # the stand-in graph writes into the outputs it returns
        outputs = self._outputs(step, capacity)
        return EagerGraph(step, capacity, outputs), outputs

    def __call__(self, tokens, pos, pad_lens=None):
        logits = super().__call__(tokens, pos, pad_lens)
        self.log.append((pos, self.capacities()))
        return logits

    def capacities(self) -> list[int]:
        return sorted({capacity for _, capacity, _ in self._graphs})


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(fast_decode, "MIN_BUCKET", 8)  # buckets(32) == [8, 16, 32]
    assert buckets(32) == [8, 16, 32]


def greedy_ids(generator: Generator, prompt: list[int], n: int) -> list[int]:
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0)
    return [t for event in generator.stream(prompt, cfg) for t in event.token_ids]


def test_load_captures_the_first_bucket_and_the_next_one_ahead_of_need(small_buckets):
    model = tiny_model(seed=7, num_key_value_heads=2, max_position_embeddings=32)
    fuse_model(model)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    plain = Generator(model, tokenizer, eos_ids=[], max_seq_len=32)
    prompt = [1, 306, 278, 3763, 2856]  # 5 tokens: decode steps write slots 5, 6, ...
    expected = greedy_ids(plain, prompt, 12)

    fast = Generator(model, tokenizer, eos_ids=[], max_seq_len=32)
    fast._ensure_cache(1)
    runner = fast.fast_decode = EagerGraphDecoder(model)
    runner.capture_first(1)  # what Engine.load does (through fast_decode.accelerate)
    assert runner.captured == 1 and runner.capacities() == [8]
    runner.log.clear()

    assert greedy_ids(fast, prompt, 12) == expected  # slots 5..15: buckets 8 and 16
    # the step at slot 5 is past half of bucket 8 and the run may reach slot 15: 16 is captured before slot 8 needs
    # it; 32 is never captured (the run ends at slot 15)
    assert runner.log[0] == (5, [8, 16])
    assert [pos for pos, _ in runner.log] == list(range(5, 16))
    assert runner.capacities() == [8, 16] and runner.captured == 2
    count, seconds = runner.later_captures()  # what `generate --stats` shows: captures after the load's
    assert runner.load_captures == 1 and count == 1 and 0 < seconds == runner.capture_s[1]

    # a short run stays in bucket 8 and captures nothing ahead; a long one captures 32 at slot 7 (half of 16)
    assert greedy_ids(fast, prompt, 2) == expected[:2] and runner.captured == 2
    runner.log.clear()
    longer = greedy_ids(fast, prompt, 26)
    assert longer == greedy_ids(plain, prompt, 26)
    assert dict(runner.log)[7] == [8, 16] and dict(runner.log)[8] == [8, 16, 32]


def test_load_compiles_each_attention_variant_once(small_buckets, monkeypatch):
    """A later bucket whose attention launch compiles apart (here 16: its chunk of 16 slots specializes as a
    multiple of 16, 8's does not) runs once eagerly at load; 32 shares 16's variant; nothing more is captured."""
    model = tiny_model(seed=8, max_position_embeddings=32)
    fuse_model(model)
    model.setup_cache(1, 32)
    runner = EagerGraphDecoder(model)
    eager = []
    original = runner._run_eager
    monkeypatch.setattr(runner, "_run_eager", lambda steps, capacity: (eager.append(capacity),
                                                                        original(steps, capacity)))
    runner.capture_first(1)
    step = runner._steps[1][0]
    variants = [fast_decode.attention_variant(step, c)[-2:] for c in (8, 16, 32)]  # how the chunk specializes
    assert variants == [(False, False), (True, False), (True, False)]
    assert len({fast_decode.attention_variant(step, c)[:-2] for c in (8, 16, 32)}) == 1  # one launch shape
    assert eager == [16] and runner.capacities() == [8]


def test_capture_every_bucket_at_load_when_asked(small_buckets):
    """TALIS_CAPTURE_ALL=1 (accelerate's `every`): the load before lazy capture, every bucket at once."""
    model = tiny_model(seed=8, max_position_embeddings=32)
    fuse_model(model)
    model.setup_cache(1, 32)
    runner = EagerGraphDecoder(model)
    runner.capture_first(1, every=True)
    assert runner.capacities() == [8, 16, 32] and runner.load_captures == 3 and runner.later_captures()[0] == 0


def test_without_expect_buckets_are_captured_on_first_use_only(small_buckets):
    """Callers that do not say how far they go (a tensor-parallel rank follows rank 0's steps) capture a bucket
    when a step first needs it, never ahead."""
    model = tiny_model(seed=8, max_position_embeddings=32)
    fuse_model(model)
    model.setup_cache(1, 32)
    runner = EagerGraphDecoder(model)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        for pos in (3, 7, 8, 20):
            runner(token, pos)
    assert runner.log == [(3, [8]), (7, [8]), (8, [8, 16]), (20, [8, 16, 32])]


def test_ahead_bucket_follows_half_of_the_bucket_and_the_reach():
    model = tiny_model(seed=9, max_position_embeddings=2048)
    model.setup_cache(1, 2048)
    runner = CudaGraphDecoder(model)
    runner._check_cache()
    assert runner._buckets == [128, 256, 512, 1024, 2048]
    assert runner.ahead_bucket(100) is None  # nothing expected: lazy only
    runner.expect(1000)
    assert runner.ahead_bucket(62) is None and runner.ahead_bucket(63) == 256  # slot 63 is the 64th of 128
    assert runner.ahead_bucket(300) == 1024 and runner.ahead_bucket(255) == 512
    assert runner.ahead_bucket(600) is None  # bucket 1024 is this run's last: 2048 is beyond slot 1000
    runner.expect(200)
    assert runner.ahead_bucket(100) == 256 and runner.ahead_bucket(130) is None
    assert runner.ahead_bucket(2047) is None  # the last bucket


def test_stats_and_bench_report_show_the_load_phases_and_later_captures():
    from rich.console import Console

    from talis_cli import bench
    from talis_cli.generation import GenerationStats
    from talis_cli.repl.render import print_stats_block

    console = Console(record=True, width=100)
    stats = GenerationStats(prompt_tokens=5, new_tokens=12, prefill_s=0.01, decode_s=0.02, first_token_s=0.012)
    phases = {"imports": 4.4, "weights read": 0.5, "CUDA graphs": 0.25}
    print_stats_block(stats, load_s=5.15, total_s=6.0, console=console, load_phases=phases, show_memory=False,
                      graph_captures=(2, 0.0375))
    lines = console.export_text().splitlines()
    assert "  CUDA graphs:        0.250 s" in lines
    assert "graphs captured:      2 during the run, 37.5 ms" in lines
    rows = [dict(variant="talis", decode_tok_s=600.0, pct_floor=50.0, prefill_tok_s=6e3, ttft_ms=21.0,
                 bytes_per_token_gb=3.7, peak_vram_gb=4.5, ms_per_token=1.6)]
    report = dict(model="/tmp/r7", bits=4, group_size=128, act_order=False, prompt=128, gen=128, ctx=256,
                  device="X", torch="2", copy_tb_s=4.2, rows=rows, notes=[], load_s=5.15, load_phases=phases)
    assert "load 5.15 s: imports 4.40, weights read 0.50, CUDA graphs 0.25" in bench.format_report(report).splitlines()


# --- GPU: real CUDA graphs ------------------------------------------------------------------------------------
@gpu
@needs_cuda
def test_engine_load_captures_one_bucket_and_replies_cross_buckets_as_the_eager_step():
    """Engine.load captures the first context bucket only; a reply crossing 128 slots (to slot 199) captures 256
    ahead of need (512, beyond the reply, never; the embedded model's context is 512) and gives the greedy tokens
    of the same steps run eagerly."""
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=512))
    runner = engine.generator.fast_decode
    assert runner.captured == 1 and {capacity for _, capacity, _ in runner._graphs} == {128}
    assert "CUDA graphs" in engine.load_phases.phases
    prompt = engine.encode("In the beginning God created the heaven and the earth.")
    n = 200 - len(prompt)

    def reply(decoder) -> list[int]:
        """n greedy tokens, no EOS (the reply runs to slot 198); a fresh generator: the whole prompt prefilled"""
        generator = Generator(engine.model, engine.tokenizer, [], engine.max_seq_len)
        generator.fast_decode, generator.prefill = decoder, engine.generator.prefill
        return greedy_ids(generator, prompt, n)

    graphs = reply(runner)
    assert len(graphs) == n and {capacity for _, capacity, _ in runner._graphs} == {128, 256}
    assert graphs == reply(EagerGraphDecoder(engine.model))  # the same kernels, launched one by one


@gpu
@needs_cuda
def test_generate_stats_show_the_graphs_captured_during_the_run():
    import re
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_cli import talis_env

    done = subprocess.run([sys.executable, "-m", "talis_cli", "generate", "-p", "In the beginning", "-n", "200",
                           "--temperature", "0", "--stats"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env=talis_env())
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  CUDA graphs: +[0-9.]+ s$", done.stderr, re.M)
    assert re.search(r"^graphs captured: +[0-9]+ during the run, [0-9.]+ ms$", done.stderr, re.M)


@gpu
@needs_cuda
def test_capture_all_switch_restores_the_load_of_every_bucket(monkeypatch):
    from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded model is not built yet")
    monkeypatch.setenv("TALIS_CAPTURE_ALL", "1")
    engine = Engine.load(LoadSettings(device_map="auto", max_seq_len=512))
    runner = engine.generator.fast_decode
    assert {capacity for _, capacity, _ in runner._graphs} == {128, 256, 512} and runner.load_captures == 3
