"""Time `talis serve` in-process: one streaming client, then rounds of concurrent ones, next to the engine's own
single-stream decode of the same engine (the same loaded model) in the same process.

    PYTHONPATH=. python scripts/bench_serve.py --model DIR            # a model folder
    PYTHONPATH=. python scripts/bench_serve.py --shape 7B             # random GPTQ weights (scripts/random_checkpoint.py)
    PYTHONPATH=. python scripts/bench_serve.py                        # the embedded model (also on a CPU)

Each round sends, from a client process of its own, N concurrent streaming /v1/completions requests (greedy, distinct prompts of --prompt tokens,
--gen tokens each) after a warm-up round of the same size (CUDA graphs of that batch size get captured there).
Reported per round: aggregate decode tok/s (completion tokens of the round / its wall time), the mean decode rate
of one stream (server timings), time to first token at the client (mean and worst) and per the server, how many
replies equal their prompt's greedy text generated alone (Generator.stream, one row); for the
engine: decode tok/s and time to first token of Generator.stream, as `talis bench` times a single stream.
Defaults: on a GPU rounds 1, 8, 32 with --max-batch 16 and --gen 128; on a CPU 1, 4, 8, --max-batch 8, --gen 32.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from talis_cli.engine import Engine, LoadSettings
from talis_cli.generation import GenerationConfig
from talis_cli.server.run import BackgroundServer, serve_engine
from talis_cli.settings import RunSettings
from talis_cli.threads import SERVER_RESERVED_CORES

SENTENCE = "And God said, Let there be light: and there was light. "


def prompt_texts(engine, count: int, tokens: int) -> list[str]:
    """`count` distinct prompts of about `tokens` tokens each (BOS included)."""
    texts = []
    for i in range(count):
        words = f"Reader {i}: {SENTENCE * (tokens // 8 + 2)}".split()
        while len(engine.encode(" ".join(words))) > tokens and len(words) > 1:
            words.pop()
        texts.append(" ".join(words))
    return texts


def step_times(engine, max_batch: int) -> dict:
    """Milliseconds per per-row decode step (CUDA graphs) at 1, 2, 4, ... max_batch rows, replayed back to back
    (`launch`), and with the host reading one token per row after each step as the scheduler does (`read`)."""
    from talis_cli.scheduler import Scheduler

    fast = engine.generator.fast_decode
    if getattr(fast, "decode_rows", None) is None:
        return {}
    Scheduler(engine.generator, max_batch=max_batch).warm_up()
    times, rows = {}, 1
    with torch.inference_mode():
        while rows <= max_batch:
            tokens = torch.zeros(rows, dtype=torch.long)
            slots = torch.full((rows,), 200, dtype=torch.long)
            cache_rows = torch.arange(rows)
            laps = {}
            for mode in ("launch", "read"):
                for reps in (5, 50):
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    for _ in range(reps):
                        logits = fast.decode_rows(tokens, slots, cache_rows)
                        if mode == "read":
                            logits.argmax(-1).tolist()
                    torch.cuda.synchronize()
                laps[mode] = round((time.perf_counter() - began) * 1000 / reps, 3)
            times[rows] = laps
            rows *= 2
    return times


def scheduler_round(engine, texts: list[str], gen: int, max_batch: int, profile: bool = False) -> dict:
    """The scheduler alone (no HTTP, stepped on this thread): aggregate decode tok/s of len(texts) greedy requests
    submitted at once, the mean batch, and the stepping thread's CPU time per decode step."""
    from talis_cli.scheduler import Scheduler

    scheduler = Scheduler(engine.generator, max_batch=max_batch, max_queue=len(texts) + 8)
    scheduler.warm_up()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=gen)
    ids = [engine.encode(t) for t in texts]
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    began = time.perf_counter()
    requests = [scheduler.submit(p, cfg, prompt_index=i) for i, p in enumerate(ids)]
    while scheduler.step():
        pass
    wall = time.perf_counter() - began
    if profiler is not None:
        profiler.disable()
        print_profile(profiler, f"scheduler alone, {len(texts)} requests")
    tokens = sum(r.stats.new_tokens for r in requests)
    steps = max(scheduler.decode_steps, 1)
    return {"clients": len(texts), "aggregate_tok_s": round(tokens / wall, 1),
            "mean_batch": round(scheduler.decoded_rows / steps, 2),
            "ms_per_decode_step": round(scheduler.decode_s * 1000 / steps, 3),
            "cpu_ms_per_decode_step": round(scheduler.cpu_s * 1000 / steps, 3),
            "prefill_s": round(scheduler.prefill_s, 3), "prefill_forwards": scheduler.prefill_forwards,
            "prefill_tokens": scheduler.prefill_tokens,
            "ttft_ms_mean": round(statistics.mean(r.stats.first_token_s for r in requests) * 1000, 2)}


def prefills(r: dict) -> str:
    """A round's prefill work in words."""
    return (f"{r['prefill_forwards']} prefill forwards of {r['prefill_tokens']} tokens in all, "
            f"{r['prefill_s'] * 1000:.0f} ms")


def print_profile(profiler, title: str) -> None:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    print(f"--- profile: {title} ---\n{out.getvalue()}", file=sys.stderr)


def profile_steps(scheduler):
    """A cProfile.Profile enabled inside every scheduler.step() on the scheduler's own thread."""
    import cProfile

    profiler, step = cProfile.Profile(), scheduler.step

    def profiled_step():
        profiler.enable()
        try:
            return step()
        finally:
            profiler.disable()

    scheduler.step = profiled_step
    return profiler


def engine_single_stream(engine, texts: list[str], gen: int) -> dict:
    """Decode rate and time to first token of one Generator.stream of the last of `texts` (prompts of one length),
    after the others: the first compiles and tunes, the second captures its prefill bucket's CUDA graph, so the
    timed one replays it (and finds nothing of itself in the cache), as a warmed server's requests do."""
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=gen)
    for text in texts:
        for _ in engine.generator.stream(engine.encode(text), cfg):
            pass
    stats = engine.generator.last_stats
    return {"decode_tok_s": (stats.new_tokens - 1) / stats.decode_s, "ttft_ms": stats.first_token_s * 1000,
            "tokens": stats.new_tokens}

def greedy_alone(engine, texts: list[str], gen: int) -> list[str]:
    """The greedy text of each prompt generated alone (Generator.stream, one row): what the server's replies to
    the same prompts must equal under any load."""
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=gen)
    return ["".join(event.text for event in engine.generator.stream(engine.encode(text), cfg)) for text in texts]


def same_as_alone(replies: list[str], alone: list[str]) -> dict:
    """How many replies equal their prompt's text generated alone, and where the others first differ (character
    index)."""
    differ = [next((i for i, (a, b) in enumerate(zip(r, a_)) if a != b), min(len(r), len(a_)))
              for r, a_ in zip(replies, alone) if r != a_]
    return {"greedy_same_as_alone": len(replies) - len(differ), "greedy_first_difference_at": differ}


async def one_stream(client: httpx.AsyncClient, text: str, gen: int) -> dict:
    sent, first, timings, parts = time.perf_counter(), None, None, []
    body = {"prompt": text, "max_tokens": gen, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()
            chunk = json.loads(line[6:])
            timings = chunk.get("timings", timings)
            parts += [choice["text"] for choice in chunk.get("choices", [])]
    return {"ttft_ms": (first - sent) * 1000, "timings": timings, "text": "".join(parts)}


async def round_of(url: str, texts: list[str], gen: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(texts) + 4)) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(one_stream(client, text, gen) for text in texts))
        wall = time.perf_counter() - started
    tokens = sum(r["timings"]["completion_tokens"] for r in replies)
    return {"clients": len(texts), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 1),
            "stream_decode_tok_s": round(statistics.mean(r["timings"]["decode_tokens_per_s"] for r in replies), 1),
            "ttft_ms_mean": round(statistics.mean(r["ttft_ms"] for r in replies), 2),
            "ttft_ms_max": round(max(r["ttft_ms"] for r in replies), 2),
            "server_ttft_ms_mean": round(statistics.mean(r["timings"]["time_to_first_token_ms"] for r in replies), 2),
            "queued_ms_mean": round(statistics.mean(r["timings"]["queued_ms"] for r in replies), 2),
            "texts": [r["text"] for r in replies]}


def run_round(url: str, texts: list[str], gen: int) -> dict:
    """One round, in the client process."""
    return asyncio.run(round_of(url, texts, gen))


def model_folder(opts, scratch: Path) -> Path | None:
    if opts.model:
        return Path(opts.model)
    if opts.shape:
        out = scratch / f"random-{opts.shape}"
        extra = ["--layers", str(opts.layers)] if opts.layers else []
        subprocess.run([sys.executable, str(Path(__file__).parent / "random_checkpoint.py"), "--shape", opts.shape,
                        "--out", str(out), *extra], check=True)
        return out
    return None  # the embedded model


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--shape", help="random GPTQ weights of a LLaMA shape (7B, 13B, ...) instead of --model")
    parser.add_argument("--layers", type=int, help="with --shape: fewer decoder layers (quick checks)")
    parser.add_argument("--clients", default="1,8,32" if gpu else "1,4,8", help="concurrent clients per round")
    parser.add_argument("--max-batch", type=int, default=16 if gpu else 8)
    parser.add_argument("--prompt", type=int, default=128 if gpu else 32, help="prompt tokens")
    parser.add_argument("--gen", type=int, default=128 if gpu else 32, help="tokens generated per request")
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval for the server (seconds)")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest scheduler-alone round (stderr)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    opts = parser.parse_args()
    clients = [int(c) for c in opts.clients.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(opts, Path(scratch))
        max_seq_len = opts.prompt + opts.gen + 16
        settings = RunSettings(model=folder, max_seq_len=max_seq_len)
        # torch's threads as `talis serve` sets them: one core left to the HTTP side and the clients
        engine = Engine.load(LoadSettings(model_dir=folder, max_seq_len=max_seq_len,
                                          reserve_cores=SERVER_RESERVED_CORES))
        texts = prompt_texts(engine, 2 * max(clients) + 3, opts.prompt)
        report = {"model": str(folder or "embedded"), "device": torch.cuda.get_device_name() if gpu else "cpu",
                  "max_batch": opts.max_batch, "prompt_tokens": len(engine.encode(texts[0])), "gen": opts.gen,
                  "engine_single_stream": engine_single_stream(engine, texts[-3:], opts.gen)}
        if gpu:
            report["step_ms"] = step_times(engine, opts.max_batch)
        report["scheduler_alone"] = [scheduler_round(engine, texts[:n], opts.gen, opts.max_batch,
                                                     profile=opts.profile and n == max(clients)) for n in clients]
        alone = greedy_alone(engine, texts[:max(clients)], opts.gen)  # before the server's scheduler owns the model
        if opts.switch_interval:
            sys.setswitchinterval(opts.switch_interval)
        served = serve_engine(engine, settings, GenerationConfig(temperature=0.0), opts.max_batch, max(clients) + 8)
        rounds = []
        # the clients run in a process of their own, so that they do not take the server's interpreter lock
        with BackgroundServer(served) as server, multiprocessing.get_context("spawn").Pool(1) as clients_process:
            scheduler = served.scheduler
            for n in clients:
                # warm-up (graphs), with other prompts: the timed ones find no cached prefix of themselves
                clients_process.apply(run_round, (server.url, texts[-n:], min(opts.gen, 16)))
                before = (scheduler.decode_steps, scheduler.decoded_rows, scheduler.decode_s, scheduler.cpu_s,
                          scheduler.prefill_s, scheduler.prefill_forwards, scheduler.prefill_tokens)
                rounds.append(clients_process.apply(run_round, (server.url, texts[:n], opts.gen)))
                steps = max(scheduler.decode_steps - before[0], 1)
                rounds[-1].update(mean_batch=round((scheduler.decoded_rows - before[1]) / steps, 2),
                                  ms_per_decode_step=round((scheduler.decode_s - before[2]) * 1000 / steps, 3),
                                  cpu_ms_per_decode_step=round((scheduler.cpu_s - before[3]) * 1000 / steps, 3),
                                  prefill_s=round(scheduler.prefill_s - before[4], 3),
                                  prefill_forwards=scheduler.prefill_forwards - before[5],
                                  prefill_tokens=scheduler.prefill_tokens - before[6])
            if opts.profile:  # an extra round of the most clients, its steps profiled on the scheduler thread
                profiler = profile_steps(scheduler)
                clients_process.apply(run_round, (server.url, texts[:max(clients)], opts.gen))
                del scheduler.step  # the class's own step again
                print_profile(profiler, f"server's scheduler thread, {max(clients)} clients")
        for r in rounds:
            r.update(same_as_alone(r.pop("texts"), alone))
        single = next((r for r in rounds if r["clients"] == 1), None)
        for r in rounds:
            r["vs_one_client"] = round(r["aggregate_tok_s"] / single["aggregate_tok_s"], 2) if single else None
        report["rounds"] = rounds
    if opts.json:
        print(json.dumps(report))
        return
    engine_stats = report["engine_single_stream"]
    print(f"{report['model']} on {report['device']}: prompt {report['prompt_tokens']} tokens, gen {opts.gen}, "
          f"max batch {opts.max_batch}")
    print(f"engine, one stream: decode {engine_stats['decode_tok_s']:.1f} tok/s, "
          f"time to first token {engine_stats['ttft_ms']:.2f} ms")
    for rows, laps in report.get("step_ms", {}).items():
        print(f"decode step, {rows} rows: {laps['launch']:.3f} ms back to back, {laps['read']:.3f} ms reading tokens")
    for r in report["scheduler_alone"]:
        print(f"scheduler alone, {r['clients']} requests: {r['aggregate_tok_s']:.1f} tok/s, mean batch "
              f"{r['mean_batch']}, {r['ms_per_decode_step']:.3f} ms per step ({r['cpu_ms_per_decode_step']:.3f} CPU), "
              f"TTFT {r['ttft_ms_mean']:.2f} ms, {prefills(r)}")
    for r in rounds:
        print(f"server, {r['clients']} clients: mean batch {r['mean_batch']}, {r['ms_per_decode_step']:.3f} ms per "
              f"step ({r['cpu_ms_per_decode_step']:.3f} CPU), queued {r['queued_ms_mean']:.2f} ms, {prefills(r)}")
    print(f"{'clients':>7} {'aggregate tok/s':>15} {'x one':>6} {'per stream tok/s':>16} {'TTFT ms (client)':>16} "
          f"{'TTFT max':>9} {'TTFT ms (server)':>16} {'greedy = alone':>14}")
    for r in rounds:
        print(f"{r['clients']:>7} {r['aggregate_tok_s']:>15.1f} {r['vs_one_client'] or 0:>6.2f} "
              f"{r['stream_decode_tok_s']:>16.1f} {r['ttft_ms_mean']:>16.2f} {r['ttft_ms_max']:>9.2f} "
              f"{r['server_ttft_ms_mean']:>16.2f} {r['greedy_same_as_alone']:>9d} of {r['clients']}")
    differ = {r["clients"]: r["greedy_first_difference_at"] for r in rounds if r["greedy_first_difference_at"]}
    if differ:
        print(f"replies that differ from their prompt alone, first differing character by round: {differ}")


if __name__ == "__main__":
    main()
