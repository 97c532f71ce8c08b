"""`talis generate --url` and `talis chat --url` against a real `talis serve` of the embedded model.

Every reply is compared with the engine's own generation in this process for the same prompt and settings
(talis_cli.repl.session.encode_prompt: what local `talis generate` sends to the generator).
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from talis_cli.errors import TalisError
from tests.serve_process import REPO, client_env, free_port, talis_serve

KEY = "test-key-7"
GREEDY = ["--temperature", "0", "-n", "10"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with talis_serve("--api-key", KEY, log_path=tmp_path_factory.mktemp("serve") / "log") as address:
        yield address


@pytest.fixture(scope="module")
def engine():
    from talis_cli.engine import Engine, LoadSettings

    return Engine.load(LoadSettings())


def local_text(engine, text, *, system=None, chat=False, **settings) -> str:
    """What local `talis generate` writes for `text` with these settings (the engine in this process)."""
    from talis_cli.generation import GenerationConfig
    from talis_cli.repl.session import encode_prompt, with_stops

    ids, stops = encode_prompt(engine, text, system, None, chat)
    config = with_stops(GenerationConfig(**settings), stops)
    return "".join(event.text for event in engine.generator.stream(ids, config))


def talis(*args, stdin: str = "", key: str | None = KEY, timeout: float = 60) -> subprocess.CompletedProcess:
    env = client_env(**({"TALIS_API_KEY": key} if key else {}))
    return subprocess.run([sys.executable, "-m", "talis_cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def one_line_error(result) -> str:
    """The single stderr line of a failed run (and no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_generate_url_gives_the_text_of_local_generate(url, engine):
    raw = talis("generate", "--url", url, "-p", "And God said", *GREEDY, "--stats")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == local_text(engine, "And God said", max_new_tokens=10, temperature=0.0) + "\n"
    # --stats: the block of a local run from the server's timings, without a load phase or this process's memory
    assert "time to first token:" in raw.stderr and "eval count:           10 token(s)" in raw.stderr
    assert "load duration" not in raw.stderr and "memory" not in raw.stderr

    chat = talis("generate", "--url", url, "--system", "Be brief.", "-p", "Who made the earth?", *GREEDY)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == local_text(engine, "Who made the earth?", system="Be brief.", chat=True,
                                     max_new_tokens=10, temperature=0.0) + "\n"


def test_each_line_runs_concurrently_and_writes_in_input_order(url, engine):
    lines = ["In the beginning", "", "And the earth", "The LORD is my shepherd", "Blessed are"]
    result = talis("generate", "--url", url, "--each-line", "--json", "--batch-size", "3", *GREEDY,
                   stdin="\n".join(lines) + "\n")
    assert result.returncode == 1  # the blank line
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == lines
    assert records[1]["error"] == "line 2 is blank; its output line is left empty"
    for line, record in zip(lines, records):
        if line:
            assert record["text"] == local_text(engine, line, max_new_tokens=10, temperature=0.0)
            assert record["generated_tokens"] == 10 and record["finish_reason"] == "length"
            assert record["prompt_tokens"] == len(engine.encode(line, add_bos=True))
    assert one_line_error(result) == "error: line 2 is blank; its output line is left empty"

    # sampled with a seed: line i draws what it draws in a local --each-line run (the seed of row i)
    from talis_cli.sampling import row_seed

    seeded = talis("generate", "--url", url, "--each-line", "--seed", "11", "-n", "8", stdin="In the beginning\nAnd the earth\n")
    assert seeded.returncode == 0, seeded.stderr
    assert seeded.stdout.splitlines() == [
        local_text(engine, text, max_new_tokens=8, seed=row_seed(11, index)).replace("\n", " ")
        for index, text in enumerate(["In the beginning", "And the earth"])]


def test_a_wrong_or_missing_key_is_one_line(url):
    wrong = talis("generate", "--url", url, "-p", "Hi", "--api-key", "not-the-key")
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert one_line_error(wrong) == (
        f"error: the server at {url} refused the request (401 invalid API key: it differs from the key talis serve "
        "was started with); check --api-key or TALIS_API_KEY")
    missing = talis("generate", "--url", url, "-p", "Hi", key=None)
    assert missing.returncode == 1
    assert one_line_error(missing).endswith("; pass the server's key with --api-key KEY or the TALIS_API_KEY variable")


def test_server_down_is_one_line():
    down = f"http://127.0.0.1:{free_port()}"
    result = talis("generate", "--url", down, "-p", "Hi")
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith(f"error: cannot reach {down}: ") and line.endswith("; is `talis serve` running?")


def test_a_prompt_longer_than_the_context_is_one_line(url):
    result = talis("generate", "--url", url, "-p", "word " * 700, "-n", "4")
    assert result.returncode == 1 and result.stdout == ""
    line = one_line_error(result)
    assert line.startswith("error: the server refused the request (400): the prompt is ")
    assert "too many for a context of 512" in line


def test_local_model_flags_are_refused_with_url():
    for flags, wanted in [(["--model", "/nowhere"], "--model sets up a local model"),
                          (["--template", "chatml"], "--template applies to a local model"),
                          (["--typical-p", "0.5"], "typical_p is not a request setting of `talis serve`")]:
        result = talis("generate", "--url", f"http://127.0.0.1:{free_port()}", "-p", "Hi", *flags)
        assert result.returncode == 2 and wanted in one_line_error(result)


def mock_client(handler):
    from talis_cli.remote.client import ServerClient

    return ServerClient("http://talis.test:8000", transport=httpx.MockTransport(handler))


def test_a_busy_server_and_a_broken_stream_are_one_line():
    """The answers of a server under load or dying mid-reply, made with httpx's mock transport."""
    from talis_cli.generation import GenerationConfig

    busy = mock_client(lambda request: httpx.Response(429, json={"error": {
        "message": "the queue is full (64 requests wait)", "type": "rate_limit_error", "param": None, "code": None}}))
    with pytest.raises(TalisError) as caught:
        list(busy.complete("Hi", GenerationConfig()))
    assert str(caught.value) == ("the server at http://talis.test:8000 is busy (429 the queue is full (64 requests "
                                 "wait)); try again in a moment")

    chunk = {"choices": [{"index": 0, "text": "And", "finish_reason": None}]}
    cut = mock_client(lambda request: httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\n",
                                                     headers={"content-type": "text/event-stream"}))
    reply = cut.complete("Hi", GenerationConfig())
    events = []
    with pytest.raises(TalisError, match="ended before it was complete; is `talis serve` still running"):
        for event in reply:
            events.append(event.text)
    assert events == ["And"]


def test_chat_url_streams_replies_with_the_stats_line(url, engine, tmp_path):
    """The REPL (driven as tests/test_repl.py drives it) on a RemoteChatSession: replies as local chat gives
    them, one stats line each from the server's timings, /set changing the request, /info refused."""
    from talis_cli.chat_templates import resolve_template
    from talis_cli.generation import GenerationConfig
    from talis_cli.remote.chat import RemoteChatSession
    from talis_cli.repl.session import render_chat, with_stops
    from tests.test_repl import drive

    session = RemoteChatSession.connect(url, KEY, GenerationConfig(max_new_tokens=8, temperature=0.0),
                                        system="Be brief.")
    printed = drive(session, "Who made the earth?\r/set max_new_tokens 3\rAnd the sea?\r/info\r/preset model\r"
                             "/stats\r", tmp_path / "history")
    template = resolve_template(None, engine.tokenizer)

    def expected(messages, max_new_tokens):
        ids = render_chat(engine, template, "Be brief.", messages)
        config = with_stops(GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0), template.stop)
        return "".join(event.text for event in engine.generator.stream(ids, config))

    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == expected(session.messages[:1], 8)
    assert session.messages[3]["content"] == expected(session.messages[:3], 3)
    stats_lines = [line for line in printed.splitlines() if line.startswith("prompt ") and "| reply " in line]
    assert len(stats_lines) == 2 and "| reply 3 tok, " in stats_lines[1] and "first token" in stats_lines[1]
    assert "RSS" not in stats_lines[1]  # this process's memory says nothing of the server's
    assert "/info needs a local model" in printed
    assert "/preset model needs a local model" in printed and session.config.max_new_tokens == 3
    assert "generated tokens  3" in printed  # /stats: the last reply, from the server's timings
    session.client.close()


def test_talis_chat_url_on_a_terminal(url, tmp_path):
    """The whole command: `talis chat --url` on a pseudo-terminal answers, shows the stats line, and leaves with
    Ctrl-D; with the server down it is one line and exit 1."""
    from tests.test_repl import Terminal

    env = client_env(XDG_DATA_HOME=str(tmp_path / "data"), TERM="xterm-256color", COLUMNS="120", LINES="40",
                     PROMPT_TOOLKIT_NO_CPR="1", NO_COLOR="1", TALIS_API_KEY=KEY)
    terminal = Terminal([sys.executable, "-m", "talis_cli", "chat", "--url", url, "--temperature", "0", "-n", "6"], env)
    try:
        terminal.expect(b">>>")
        terminal.send("Who made the earth?\r")
        terminal.expect(b"| reply 6 tok, ")
        terminal.expect(b">>>")
        terminal.send("\x04")
        assert terminal.close() == 0
    finally:
        terminal.process.kill()

    down = f"http://127.0.0.1:{free_port()}"
    terminal = Terminal([sys.executable, "-m", "talis_cli", "chat", "--url", down], env)
    try:
        terminal.expect(f"cannot reach {down}: Connection refused; is `talis serve` running?".encode())
        assert terminal.close() == 1 and b"Traceback" not in terminal.output
    finally:
        terminal.process.kill()


def context_limited_server(limit_chars: int, seen: list):
    """A mock `talis serve` whose context holds `limit_chars` characters of message content: a longer conversation
    gets its 400 context_length_exceeded, a shorter one the streamed reply "ok" (each request's messages go to
    `seen`)."""
    def handler(request):
        messages = json.loads(request.content)["messages"]
        seen.append([m["content"] for m in messages])
        if sum(len(m["content"]) for m in messages) > limit_chars:
            return httpx.Response(400, json={"error": {
                "message": "the prompt is 900 tokens, too many for a context of 512", "type": "invalid_request_error",
                "param": "messages", "code": "context_length_exceeded"}})
        chunk = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}],
                 "timings": {"prompt_tokens": 7, "completion_tokens": 1, "time_to_first_token_ms": 5.0}}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})

    return mock_client(handler)


def test_chat_url_drops_the_oldest_exchanges_the_servers_context_cannot_hold(tmp_path):
    """As local chat does, `chat --url` drops the oldest exchanges (the system prompt and the newest message stay)
    while the server answers that the conversation outgrew its context, and says so; when the newest message alone
    does not fit, the error is one line and the conversation stays as it was."""
    from talis_cli.generation import GenerationConfig
    from talis_cli.remote.chat import RemoteChatSession
    from talis_cli.remote.client import ServerError
    from tests.test_repl import drive

    seen = []
    session = RemoteChatSession(context_limited_server(40, seen), "m", GenerationConfig(), system="sys")
    session.messages = [{"role": "user", "content": "first " * 3}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "second " * 3}, {"role": "assistant", "content": "a2"}]
    printed = drive(session, "third\r", tmp_path / "history")
    assert [m["content"] for m in session.messages] == ["second " * 3, "a2", "third", "ok"]
    assert seen == [["sys", "first " * 3, "a1", "second " * 3, "a2", "third"], ["sys", "second " * 3, "a2", "third"]]
    assert "dropped the 1 oldest exchange(s) before this reply" in printed

    seen.clear()
    before = list(session.messages)
    session.messages.append({"role": "user", "content": "x" * 60})
    with pytest.raises(ServerError, match="too many for a context of 512") as caught:
        session.reply(None, lambda text: None)
    assert caught.value.code == "context_length_exceeded"
    assert session.messages == before + [{"role": "user", "content": "x" * 60}]  # nothing lost
    assert len(seen) == 3  # the whole conversation, then without each older exchange


def test_chat_url_tells_a_full_context_from_a_length_limit(tmp_path):
    """talis' own finish reason from the server's timings reaches the client (OpenAI's folds context into length):
    a reply the server's context cut says so, and how to make room."""
    from talis_cli.generation import GenerationConfig
    from talis_cli.remote.chat import RemoteChatSession
    from tests.test_repl import drive

    def handler(request):
        chunk = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "length"}],
                 "timings": {"finish_reason": "context", "prompt_tokens": 510, "completion_tokens": 2}}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})

    session = RemoteChatSession(mock_client(handler), "m", GenerationConfig())
    printed = drive(session, "hello\r", tmp_path / "history")
    assert "the reply stopped: the server's context is full" in printed
    reply = session.client.chat([{"role": "user", "content": "hi"}], GenerationConfig())
    with reply:
        assert [event.finish_reason for event in reply] == ["context"]
