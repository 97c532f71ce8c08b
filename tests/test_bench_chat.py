"""scripts/bench_chat.py on the CPU: a conversation through ChatSession whose every reply after the first reuses
the cached conversation, timed as the REPL's stats line times it."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_chat_reports_each_replys_first_token_and_cache_reuse():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_chat.py"), "--turns", "12,40,6",
                           "--reply", "5", "--max-seq-len", "512", "--json"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    turns = report["turns"]
    assert all(n - 4 <= t["message_tokens"] <= n for t, n in zip(turns, [12, 40, 6]))  # whole words, counted
    assert len(turns) == 3 and report["reply_tokens"] == 5
    assert turns[0]["reused_tokens"] == 0 and all(t["dropped"] == 0 for t in turns)
    for before, after in zip(turns, turns[1:]):
        # the whole earlier prompt is cached (the reply's tokens too, less what the template renders anew)
        assert before["prompt_tokens"] <= after["reused_tokens"] < after["prompt_tokens"]
    assert all(t["first_token_ms"] > 0 and re.search(r"\| first token \d+\.\d ms", t["stats_line"]) for t in turns)
    assert report["later_replies_max_ms"] == max(t["first_token_ms"] for t in turns[1:])
