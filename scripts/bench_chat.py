"""Time to first token of every reply of a `talis chat` conversation, as the REPL's stats line reports it.

    PYTHONPATH=. python3 scripts/bench_chat.py [--model DIR | --shape 7B] [--turns 16,8,32,...] [--reply 16]

Loads the model as `talis chat` does (Engine.load: CUDA graphs on a GPU) and drives the same ChatSession the REPL's
prompt loop drives (fit_to_context, then reply: the conversation re-rendered through the chat template, its cached
prefix reused) with user messages of about --turns tokens each, --reply greedy tokens per reply, default
template. Per reply it prints the prompt tokens computed and reused, the time to first token and the REPL's own
stats line. Issue 14's target: every reply after the first starts within 20 ms, whatever its length (up to 512
new tokens). --shape writes a random GPTQ folder first (scripts/random_checkpoint.py); without --model or --shape
it runs the embedded model (also on a CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_serve import SENTENCE, model_folder

from talis_cli.engine import Engine, LoadSettings
from talis_cli.generation import GenerationConfig
from talis_cli.repl.render import stats_line
from talis_cli.repl.session import ChatSession
from talis_cli.warm_up import BackgroundWarmUp

TURNS = "16,8,32,64,128,256,512,100,24"  # new tokens of each user message: every prefill bucket, continued


def message(engine, turn: int, tokens: int) -> str:
    """A user message of about `tokens` tokens (as the tokenizer counts them alone) that names its turn, so no
    message repeats an earlier one."""
    words = f"Turn {turn}: {SENTENCE * (tokens // 8 + 2)}".split()
    while len(engine.encode(" ".join(words), add_bos=False)) > tokens and len(words) > 1:
        words.pop()
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--shape", help="random GPTQ weights of a LLaMA shape (7B, 13B, ...) instead of --model")
    parser.add_argument("--layers", type=int, help="with --shape: fewer decoder layers (quick checks)")
    parser.add_argument("--turns", default=TURNS, help="tokens of each user message, in order")
    parser.add_argument("--reply", type=int, default=16, help="tokens generated per reply")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--typing", type=float, default=3.0,
                        help="seconds between the load and the first message (the user typing it), while the "
                             "background warm-up runs")
    parser.add_argument("--no-warm-up", action="store_true", help="no background warm-up (for comparisons)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    opts = parser.parse_args()
    turns = [int(t) for t in opts.turns.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        folder = model_folder(opts, Path(scratch))
        engine = Engine.load(LoadSettings(model_dir=folder, max_seq_len=opts.max_seq_len))
        warm = None if opts.no_warm_up else BackgroundWarmUp(engine.generator).start()
        session = ChatSession(engine, GenerationConfig(temperature=0.0, max_new_tokens=opts.reply), warm_up=warm)
        time.sleep(opts.typing)
        waited = warm.wait() if warm is not None else 0.0  # what the first reply waits (counted in its first token)
        rows = []
        for i, tokens in enumerate(turns):
            text = message(engine, i + 1, tokens)
            session.add_user(text)
            ids, dropped = session.fit_to_context()
            stats = session.reply(ids, lambda text: None).stats
            rows.append(dict(turn=i + 1, message_tokens=len(engine.encode(text, add_bos=False)), prompt_tokens=len(ids),
                             reused_tokens=stats.reused_tokens, first_token_ms=round(stats.first_token_s * 1000, 2),
                             dropped=dropped, stats_line=stats_line(stats)))
    later = [r["first_token_ms"] for r in rows[1:]]
    report = dict(model=str(folder or "embedded"), load_s=round(engine.load_s, 3), reply_tokens=opts.reply,
                  warm_up_s=round(warm.seconds, 3) if warm is not None else None, typing_s=opts.typing,
                  first_reply_waited_s=round(waited, 3),
                  turns=rows, later_replies_max_ms=max(later, default=None),
                  later_replies_median_ms=statistics.median(later) if later else None)
    if opts.json:
        print(json.dumps(report))
        return
    print(f"{report['model']}: load {report['load_s']:.2f} s, {opts.reply} tokens a reply, warm-up "
          f"{report['warm_up_s']} s in the background ({opts.typing} s of typing; the first reply waited "
          f"{waited:.2f} s more)")
    print(f"{'turn':>4} {'message tok':>11} {'prompt tok':>10} {'reused':>6} {'dropped':>7} {'first token ms':>14}"
          "  stats line")
    for r in rows:
        print(f"{r['turn']:>4} {r['message_tokens']:>11} {r['prompt_tokens']:>10} {r['reused_tokens']:>6} "
              f"{r['dropped']:>7} {r['first_token_ms']:>14.2f}  {r['stats_line']}")
    if later:
        print(f"replies after the first: first token max {max(later):.2f} ms, median "
              f"{statistics.median(later):.2f} ms (target: every one within 20 ms)")


if __name__ == "__main__":
    main()
