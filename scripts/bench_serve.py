"""Time `talis serve` in-process: one streaming client, then rounds of concurrent ones, next to the engine's own
single-stream decode of the same model in the same process.

    PYTHONPATH=. python scripts/bench_serve.py --model DIR            # a model folder
    PYTHONPATH=. python scripts/bench_serve.py --shape 7B             # random GPTQ weights (scripts/random_checkpoint.py)
    PYTHONPATH=. python scripts/bench_serve.py                        # the embedded model (also on a CPU)

Each round sends N concurrent streaming /v1/completions requests (greedy, distinct prompts of --prompt tokens,
--gen tokens each) after a warm-up round of the same size (CUDA graphs of that batch size get captured there).
Reported per round: aggregate decode tok/s (completion tokens of the round / its wall time), the mean decode rate
of one stream (server timings), time to first token at the client (mean and worst) and per the server; for the
engine: decode tok/s and time to first token of Generator.stream, as `talis bench` times a single stream.
Defaults: on a GPU rounds 1, 8, 32 with --max-batch 16 and --gen 128; on a CPU 1, 4, 8, --max-batch 8, --gen 32.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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
from talis_cli.server.run import BackgroundServer, load_served
from talis_cli.settings import RunSettings

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


def engine_single_stream(engine, text: str, gen: int) -> dict:
    """Decode rate and time to first token of one Generator.stream (the second of two runs)."""
    ids = engine.encode(text)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=gen)
    for _ in range(2):
        for _ in engine.generator.stream(ids, cfg):
            pass
    stats = engine.generator.last_stats
    return {"decode_tok_s": (stats.new_tokens - 1) / stats.decode_s, "ttft_ms": stats.first_token_s * 1000,
            "tokens": stats.new_tokens}


async def one_stream(client: httpx.AsyncClient, text: str, gen: int) -> dict:
    sent, first, timings = time.perf_counter(), None, None
    body = {"prompt": text, "max_tokens": gen, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()
            chunk = json.loads(line[6:])
            timings = chunk.get("timings", timings)
    return {"ttft_ms": (first - sent) * 1000, "timings": timings}


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
            "server_ttft_ms_mean": round(statistics.mean(r["timings"]["time_to_first_token_ms"] for r in replies), 2)}


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
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    opts = parser.parse_args()
    clients = [int(c) for c in opts.clients.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(opts, Path(scratch))
        max_seq_len = opts.prompt + opts.gen + 16
        settings = RunSettings(model=folder, max_seq_len=max_seq_len)
        engine = Engine.load(LoadSettings(model_dir=folder, max_seq_len=max_seq_len))
        texts = prompt_texts(engine, max(clients), opts.prompt)
        report = {"model": str(folder or "embedded"), "device": torch.cuda.get_device_name() if gpu else "cpu",
                  "max_batch": opts.max_batch, "prompt_tokens": len(engine.encode(texts[0])), "gen": opts.gen,
                  "engine_single_stream": engine_single_stream(engine, texts[0], opts.gen)}
        del engine
        served = load_served(settings, GenerationConfig(temperature=0.0), opts.max_batch, max(clients) + 8)
        rounds = []
        with BackgroundServer(served) as server:
            for n in clients:
                asyncio.run(round_of(server.url, texts[:n], min(opts.gen, 16)))  # warm-up (graph capture)
                rounds.append(asyncio.run(round_of(server.url, texts[:n], opts.gen)))
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
    print(f"{'clients':>7} {'aggregate tok/s':>15} {'x one':>6} {'per stream tok/s':>16} {'TTFT ms (client)':>16} "
          f"{'TTFT max':>9} {'TTFT ms (server)':>16}")
    for r in rounds:
        print(f"{r['clients']:>7} {r['aggregate_tok_s']:>15.1f} {r['vs_one_client'] or 0:>6.2f} "
              f"{r['stream_decode_tok_s']:>16.1f} {r['ttft_ms_mean']:>16.2f} {r['ttft_ms_max']:>9.2f} "
              f"{r['server_ttft_ms_mean']:>16.2f}")


if __name__ == "__main__":
    main()
