"""Time talis and ExLlamaV2 on the same GPTQ folder: load (talis by phase), prefill at several prompt lengths
(the first prompt after the load apart), batch-1 greedy decode. Each engine runs in a subprocess of its own.

    PYTHONPATH=. python3 scripts/bench_peer.py MODEL_DIR|default [--prompts 128,512,2048] [--gen 128] [--json FILE]
    PYTHONPATH=. python3 scripts/bench_peer.py --shape 7B [--out DIR] ...   # a random folder (random_checkpoint.py)

Prints a table, then the JSON report (or writes it to --json). `default` is the embedded model. Default prompt
lengths beyond the model's context are left out (the embedded model holds 512 tokens). ExLlamaV2 needs
CUDA: on a CPU the script says so in one line and times talis only. On the GPU machine carry the wheel in `.peers/`
(/work/shared/peers/README.md) and put it on the path first:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/*.whl && export PYTHONPATH=/tmp/site:.
Its CUDA extension builds on the first import (minutes): `import_s` reports it apart from `load_s`.

Prefill timings are those of one prompt's forward plus the greedy draw of its first token, read on the host (time
to first token, without tokenizing); "first" is the first prompt of that length after the load (kernels compiled,
tuned or loaded from the disk caches then), the others the median of --repeats after it. Decode: --gen greedy
tokens after a 128-token prompt (shorter when the context is short), one host read per token, median of --repeats
after a warm-up run; talis through Generator.stream, as `talis generate` runs.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # a worker's clock starts before its imports
REPO = Path(__file__).resolve().parents[1]
DECODE_PROMPT = 128
DEFAULT_PROMPTS = "128,512,2048"


def model_context(model: str) -> int | None:
    """The context (max_position_embeddings) of a GPTQ folder or `default` (the embedded model); None when its
    config.json does not say."""
    folder = REPO / "talis_cli" / "default_model" if model == "default" else Path(model)
    try:
        return int(json.loads((folder / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prompt_ids(vocab: int, length: int, seed: int = 0) -> list[int]:
    """The token ids both engines get: uniform over the vocabulary above the first 3 (BOS/EOS/UNK in LLaMA)."""
    import torch

    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    """Seconds of fn(), the GPU's work included."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _prefill_report(lengths: list[int], vocab: int, first_token, repeats: int) -> dict:
    """{length: first_ms, ms (median), tok_s} of `first_token(ids)` (prefill from slot 0 + greedy draw)."""
    out = {}
    for length in lengths:
        ids = prompt_ids(vocab, length, seed=length)
        first = _timed(lambda: first_token(ids))
        median = statistics.median(_timed(lambda: first_token(ids)) for _ in range(repeats))
        out[str(length)] = {"first_ms": first * 1e3, "ms": median * 1e3, "tok_s": length / median}
    return out


# --- workers: one engine each, in its own process -------------------------------------------------------------
def talis_worker(opts) -> dict:
    """talis' report (load by phase, prefill per length, decode), JSON-ready: run in a process of its own."""
    from talis_cli.engine import Engine, LoadSettings

    # torch is imported inside the load, as `talis generate` imports it: the "imports" phase counts it
    engine = Engine.load(LoadSettings(model_dir=None if opts.model == "default" else opts.model,
                                      max_seq_len=opts.ctx, device_map="auto"))
    loaded = time.perf_counter()
    import torch

    from talis_cli.generation import GenerationConfig, Generator

    model, generator = engine.model, engine.generator
    device = model.model.embed_tokens.weight.device
    runner = generator.fast_decode

    def first_token(ids: list[int]) -> int:
        tokens = torch.tensor([ids], device=device)
        with torch.inference_mode():
            logits = generator.prefill(tokens, 0) if generator.prefill else model(tokens, last_only=True)
            return int(logits[0, -1].argmax())

    prefill = _prefill_report(opts.prompts, engine.args.vocab_size, first_token, opts.repeats)
    # no EOS: random weights must not end a reply early
    plain = Generator(model, engine.tokenizer, [], engine.max_seq_len, engine.context_limit)
    plain.fast_decode, plain.prefill = generator.fast_decode, generator.prefill
    prompt = prompt_ids(engine.args.vocab_size, min(DECODE_PROMPT, opts.ctx - opts.gen - 1))
    cfg = GenerationConfig(max_new_tokens=opts.gen, temperature=0.0)

    def reply() -> tuple[list[int], float]:
        """The greedy reply's ids and the seconds from its first token to its last, as the consumer sees them."""
        ids, first = [], None
        for event in plain.stream(prompt, cfg):
            ids += event.token_ids
            first = first or time.perf_counter()
        return ids, time.perf_counter() - first

    ids, _ = reply()  # captures the CUDA graphs the reply's context needs
    decode_s = statistics.median(reply()[1] for _ in range(opts.repeats))
    return {
        "engine": "talis", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "import_s": engine.load_phases.phases.get("imports", 0.0), "load_s": engine.load_s,
        "load_phases": engine.load_phases.phases, "start_to_loaded_s": loaded - STARTED,
        "prefill": prefill, "decode_prompt": len(prompt), "gen": opts.gen,
        "decode_tok_s": (opts.gen - 1) / decode_s if decode_s else None, "decode_ids": ids,
        "graphs_captured": runner.captured if runner is not None else 0,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }


def exllamav2_worker(opts) -> dict:
    """ExLlamaV2's report in talis' layout (no load phases); {"error": ...} when it cannot be imported."""
    t0 = time.perf_counter()
    import torch  # counted in import_s, as talis' imports phase counts it

    try:
        import exllamav2
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    except ImportError as error:
        return {"engine": "exllamav2", "error": f"cannot import exllamav2 ({error}); see this script's docstring"}
    imported = time.perf_counter()
    config = ExLlamaV2Config(opts.model)  # reads the folder (prepare() again would reread max_seq_len)
    config.max_seq_len = opts.ctx
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=opts.ctx, lazy=True)
    model.load_autosplit(cache)
    _sync()
    loaded = time.perf_counter()

    def first_token(ids: list[int]) -> int:
        cache.current_seq_len = 0
        logits = model.forward(torch.tensor([ids]), cache, last_id_only=True)
        return int(logits[0, -1].argmax())

    prefill = _prefill_report(opts.prompts, config.vocab_size, first_token, opts.repeats)
    prompt = prompt_ids(config.vocab_size, min(DECODE_PROMPT, opts.ctx - opts.gen - 1))

    def reply() -> tuple[list[int], float]:
        """The greedy reply's ids and the seconds of its decode steps (after the prompt's draw)."""
        ids = [first_token(prompt)]
        t = time.perf_counter()
        for _ in range(opts.gen - 1):
            logits = model.forward(torch.tensor([[ids[-1]]]), cache)
            ids.append(int(logits[0, -1].argmax()))  # one host read per token, as streaming does
        return ids, time.perf_counter() - t

    ids, _ = reply()  # warm-up
    decode_s = statistics.median(reply()[1] for _ in range(opts.repeats))
    return {
        "engine": f"exllamav2 {getattr(exllamav2, '__version__', '')}".strip(), "device": torch.cuda.get_device_name(),
        "import_s": imported - t0, "load_s": loaded - imported, "start_to_loaded_s": loaded - STARTED,
        "prefill": prefill, "decode_prompt": len(prompt), "gen": opts.gen,
        "decode_tok_s": (opts.gen - 1) / decode_s, "decode_ids": ids,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


WORKERS = {"talis": talis_worker, "exllamav2": exllamav2_worker}


# --- the driver ---------------------------------------------------------------------------------------------------
def run_worker(name: str, opts, timeout_s: float) -> dict:
    """One engine's report from a fresh process (its last stdout line, JSON); {"error": ...} when it fails."""
    command = [sys.executable, str(Path(__file__).resolve()), opts.model, "--worker", name,
               "--prompts", ",".join(map(str, opts.prompts)), "--gen", str(opts.gen), "--ctx", str(opts.ctx),
               "--repeats", str(opts.repeats)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": name, "error": f"no report within {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": name, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def format_table(reports: list[dict]) -> str:
    """One column per engine: load (talis' phases indented), prefill per length (first / median), decode."""
    ok = [r for r in reports if "error" not in r]
    failed = [f"{r['engine']}: {r['error']}" for r in reports if "error" in r]
    if not ok:  # no column: the errors alone, not row names with empty cells
        return "\n".join(failed)
    rows = [("", [r["engine"] for r in ok]), ("device", [r["device"] for r in ok]),
            ("import s", [f"{r['import_s']:.2f}" for r in ok]), ("load s", [f"{r['load_s']:.2f}" for r in ok])]
    phases = [name for r in ok for name in r.get("load_phases", {}) if name != "imports"]
    for name in dict.fromkeys(phases):
        rows.append((f"  {name} s", [f"{r['load_phases'][name]:.3f}" if name in r.get("load_phases", {}) else ""
                                     for r in ok]))
    rows.append(("launch to loaded s", [f"{r['start_to_loaded_s']:.2f}" for r in ok]))
    for length in dict.fromkeys(k for r in ok for k in r["prefill"]):
        cells = []
        for r in ok:
            p = r["prefill"].get(length)
            cells.append(f"{p['first_ms']:.1f} / {p['ms']:.1f} ms ({p['tok_s']:,.0f} tok/s)" if p else "")
        rows.append((f"prefill {length}: first / median", cells))
    rows.append(("decode tok/s", [f"{r['decode_tok_s']:.1f}" for r in ok]))
    width = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(ok))]
    lines = ["  ".join([name.ljust(width)] + [c.rjust(w) for c, w in zip(cells, widths)]) for name, cells in rows]
    return "\n".join(lines + failed)


def random_folder(opts) -> str:
    """The path of a random GPTQ folder of --shape (random_checkpoint.py), written at --out or in a new temporary
    folder."""
    out = opts.out or Path(tempfile.mkdtemp(prefix=f"talis-{opts.shape}-"))
    command = [sys.executable, str(REPO / "scripts" / "random_checkpoint.py"), "--shape", opts.shape, "--out", str(out)]
    if opts.layers:
        command += ["--layers", str(opts.layers)]
    subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=sys.stderr)
    return str(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a GPTQ folder, or `default` (the embedded model)")
    parser.add_argument("--shape", help="write a random GPTQ folder of this LLaMA shape (7B, 13B, ...) and time it")
    parser.add_argument("--out", type=Path, help="where --shape writes its folder (default: a temporary one, removed at the end)")
    parser.add_argument("--layers", type=int, help="with --shape: fewer decoder layers (quick checks)")
    parser.add_argument("--prompts", help=f"comma-separated prompt lengths to prefill (default {DEFAULT_PROMPTS}, "
                                          "those within the model's context)")
    parser.add_argument("--gen", type=int, default=128, help="greedy tokens decoded")
    parser.add_argument("--ctx", type=int, help="context (KV cache) size; default the longest prompt, or 128 + gen + 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", choices=("exllamav2", "none"), default="exllamav2")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds each engine's process may take")
    parser.add_argument("--json", type=Path, help="write the report here instead of printing it")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if (opts.model is None) == (opts.shape is None):
        parser.error("name a model folder (or `default`) or --shape, not both")
    given = opts.prompts
    opts.prompts = [int(p) for p in (given or DEFAULT_PROMPTS).split(",") if p]
    # the embedded model (512 tokens) or a folder with a short context: the default lengths it holds, its context
    context = model_context(opts.model) if opts.model and not opts.worker else None
    if context is not None:
        longer = [p for p in opts.prompts if p > context]
        if longer and (given or len(longer) == len(opts.prompts)):
            parser.error(f"prompt lengths {','.join(map(str, longer))} exceed the model's context ({context} "
                         "tokens); pass shorter --prompts")
        opts.prompts = [p for p in opts.prompts if p <= context]
    # each prompt is prefilled from slot 0 on its own: the cache holds the longest one, or the decode's run
    opts.ctx = opts.ctx or min(max(opts.prompts + [DECODE_PROMPT + opts.gen + 1]), context or 1 << 62)
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker:
        print(json.dumps(WORKERS[opts.worker](opts)), flush=True)
        return 0
    import torch

    if opts.shape:
        opts.model = random_folder(opts)
    try:
        reports = [run_worker("talis", opts, opts.timeout)]
        if opts.peer != "none":
            if torch.cuda.is_available():
                reports.append(run_worker(opts.peer, opts, opts.timeout))
            else:
                print(f"{opts.peer} needs a CUDA GPU: timing talis only", file=sys.stderr)
    finally:
        if opts.shape and opts.out is None:  # a temporary folder of gigabytes (a 70B shape: ~35 GB) goes again
            shutil.rmtree(opts.model, ignore_errors=True)
    report = {"model": opts.model, "prompts": opts.prompts, "gen": opts.gen, "ctx": opts.ctx, "engines": reports}
    print(format_table(reports))
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1) + "\n")
    else:
        print(json.dumps(report))
    return 0 if all("error" not in r for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
