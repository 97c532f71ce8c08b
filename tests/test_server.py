"""`talis serve`'s API on the embedded model: the official openai client (greedy text equals the Generator's for the
same prompt and settings), every error case over raw HTTP, the api key, /health, /metrics, a client that leaves."""

import json
import socket
import time

import httpx
import pytest
from openai import OpenAI

from talis_cli.engine import Engine
from talis_cli.conversation import encode_prompt, with_stops

from server_harness import GREEDY, LiveServer, metric_samples, serve_embedded

PROMPT = "And God said"
N = 12  # max_tokens of the comparisons: short, the embedded model is fast but the cores are shared


@pytest.fixture(scope="module")
def reference():
    """An engine of its own (the server's belongs to its scheduler thread) -> (text, finish, tokens, prompt ids)
    of a greedy reply as `talis generate` (chat=True: `talis generate --chat`) computes it."""
    engine = Engine.load()

    def reply(text: str, chat: bool = False, max_tokens: int = N):
        ids, stops = encode_prompt(engine, text, None, None, chat)
        events = list(engine.generator.stream(ids, with_stops(GREEDY.with_overrides(max_new_tokens=max_tokens), stops)))
        return "".join(e.text for e in events), events[-1].finish_reason, len(events), ids

    return reply


@pytest.fixture(scope="module")
def live():
    with serve_embedded() as server:
        yield server


@pytest.fixture
def client(live):
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, body, headers=None, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=30)


def test_completions_greedy_text_equals_the_generator(client, reference):
    text, finish, tokens, ids = reference(PROMPT)
    done = client.completions.create(model="talis-default", prompt=PROMPT, max_tokens=N, temperature=0)
    assert done.choices[0].text == text and done.choices[0].finish_reason == {"eos": "stop"}.get(finish, "length")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), tokens)
    timings = done.model_extra["timings"]
    assert timings["prompt_tokens"] == len(ids) and timings["completion_tokens"] == tokens
    assert timings["time_to_first_token_ms"] > 0 and timings["decode_tokens_per_s"] > 0

    chunks = list(client.completions.create(model="talis-default", prompt=PROMPT, max_tokens=N, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == done.choices[0].finish_reason
    assert chunks[-1].model_extra["timings"]["completion_tokens"] == tokens


def test_chat_greedy_text_equals_talis_generate_chat(client, reference):
    text, finish, tokens, ids = reference("Who made the heaven?", chat=True)
    messages = [{"role": "user", "content": "Who made the heaven?"}]
    done = client.chat.completions.create(model="talis-default", messages=messages, max_tokens=N, temperature=0)
    assert done.choices[0].message.content == text and done.choices[0].message.role == "assistant"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), tokens)

    chunks = list(client.chat.completions.create(model="talis-default", messages=messages, max_tokens=N,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == done.choices[0].finish_reason
    usage_chunk = chunks[-1]  # with include_usage: no choices, the usage and the timings
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == tokens
    assert usage_chunk.model_extra["timings"]["completion_tokens"] == tokens


def test_sse_wire_format_ends_with_done(live, reference):
    text, _, tokens, _ = reference(PROMPT, max_tokens=4)
    with httpx.stream("POST", live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["usage"]["completion_tokens"] == tokens and "timings" in chunks[-1]


def test_request_settings_override_the_servers(client, reference):
    """The server's defaults are greedy (harness); a stop string and a seed from the request apply."""
    text, _, _, _ = reference(PROMPT)
    stop = text.split()[2]
    done = client.completions.create(model="talis-default", prompt=PROMPT, max_tokens=N, stop=[stop])
    assert done.choices[0].finish_reason == "stop" and done.choices[0].text == text[: text.index(stop)]
    sampled = [client.completions.create(prompt=PROMPT, model="talis-default", max_tokens=N, temperature=1.0,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_max_completion_tokens_wins_over_max_tokens(client):
    done = client.chat.completions.create(model="talis-default", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=9, max_completion_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3 and done.choices[0].finish_reason == "length"


def test_a_reply_cut_by_the_full_context_finishes_with_length(client):
    done = client.completions.create(model="talis-default", prompt="And God said " * 168, max_tokens=50, temperature=0)
    assert done.usage.prompt_tokens + done.usage.completion_tokens == 512  # the context of the embedded model
    assert done.usage.completion_tokens < 50 and done.choices[0].finish_reason == "length"


def test_model_id_is_the_folders_name(tmp_path):
    from talis_cli.server.run import model_id
    from talis_cli.settings import RunSettings

    (tmp_path / "llama-7b-gptq").mkdir()
    assert model_id(RunSettings(model=tmp_path / "llama-7b-gptq" / ".")) == "llama-7b-gptq"
    assert model_id(RunSettings()) == "talis-default"


def test_the_server_leaves_a_core_to_http_and_clients(monkeypatch):
    """Without --threads, `talis serve` gives torch one core fewer than `talis generate` would (an idle 2-core
    machine: 1 thread, where generate takes 2): its event loop and local clients need a core of their own."""
    import os

    import torch

    from talis_cli import threads
    from talis_cli.server.run import load_served
    from talis_cli.settings import RunSettings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    before = torch.get_num_threads()
    try:
        assert threads.set_threads() == 2  # generate and chat
        served = load_served(RunSettings(), GREEDY, 1, 1)
        served.scheduler.stop()
        assert torch.get_num_threads() == 1
        served = load_served(RunSettings(threads=2), GREEDY, 1, 1)  # --threads wins
        served.scheduler.stop()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["talis-default"]
    assert client.models.retrieve("talis-default").id == "talis-default"
    assert httpx.get(live.url + "/health", timeout=10).json() == {"status": "ok"}


ERROR_CASES = [  # (body, path, status, param, code, words in the message)
    (b"{not json", "/v1/completions", 400, None, None, "not valid JSON"),
    (b"[1, 2]", "/v1/completions", 400, None, None, "one JSON object"),
    (b'{"prompt": "x", "temperature": Infinity}', "/v1/completions", 400, None, None,
     "not valid JSON (Infinity is not a JSON number)"),
    (b'{"prompt": "x", "top_p": NaN}', "/v1/completions", 400, None, None, "not valid JSON (NaN is not a JSON number)"),
    (b'{"prompt": "x", "temperature": 1e400}', "/v1/completions", 400, None, None,
     "not valid JSON (1e400 is too large a number)"),
    ({"max_tokens": 3}, "/v1/completions", 400, "prompt", None, "prompt is required"),
    ({"prompt": 5}, "/v1/completions", 400, "prompt", None, "valid string"),
    ({"prompt": "x", "temperature": "hot"}, "/v1/completions", 400, "temperature", None, "valid number"),
    ({"prompt": "x", "stop": 3}, "/v1/completions", 400, "stop", None, "stop must be a string or a list of strings"),
    ({"prompt": "x", "temperature": -1}, "/v1/completions", 400, "temperature", None,
     "temperature = -1.0 is out of range: allowed >= 0 (0 = greedy)"),
    ({"prompt": "x", "max_tokens": 0}, "/v1/completions", 400, "max_tokens", None,
     "max_tokens = 0 is out of range: allowed an integer >= 1"),
    ({"prompt": "x", "top_p": 1.5}, "/v1/completions", 400, "top_p", None, "0 < top_p <= 1"),
    ({"prompt": "x", "n": 2}, "/v1/completions", 400, "n", None, "n = 2 is not supported"),
    ({"prompt": "x", "top_k": -1}, "/v1/completions", 400, "top_k", None, "top_k = -1 is out of range"),
    ({"prompt": "x", "min_p": 2}, "/v1/completions", 400, "min_p", None, "0 <= min_p <= 1"),
    ({"prompt": "x", "repetition_penalty": 0}, "/v1/completions", 400, "repetition_penalty", None, "> 0 (1 disables)"),
    ({"prompt": "x", "presence_penalty": 3}, "/v1/completions", 400, "presence_penalty", None, "-2 <= presence_penalty"),
    ({"prompt": "x", "seed": 2**64}, "/v1/completions", 400, "seed", None, "seed = 18446744073709551616"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "/v1/chat/completions", 400,
     "max_completion_tokens", None, "max_completion_tokens = 0 is out of range: allowed an integer >= 1"),
    ({"prompt": "x", "model": "gpt-4"}, "/v1/completions", 404, "model", "model_not_found",
     "model 'gpt-4' does not exist here; this server serves 'talis-default'"),
    ({"messages": []}, "/v1/chat/completions", 400, "messages", None, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "/v1/chat/completions", 400, "messages.0.role", None, "role"),
    ({"messages": [{"role": "user", "content": 7}]}, "/v1/chat/completions", 400, "messages.0.content", None,
     "a string, a list of text parts or null"),
]


@pytest.mark.parametrize("body, path, status, param, code, words", ERROR_CASES)
def test_bad_requests_answer_in_openais_shape(live, body, path, status, param, code, words):
    response = post(live.url, body, path=path)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "Traceback" not in response.text
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def test_prompt_longer_than_the_context(live):
    response = post(live.url, {"prompt": "And God said " * 200, "max_tokens": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert error["message"].startswith("the prompt is 602 tokens, 91 too many for a context of 512 "
                                    "(room for 511 plus one new token)")
    assert httpx.get(live.url + "/health", timeout=10).status_code == 200  # still up


def test_a_body_over_the_limit_is_413(live, monkeypatch):
    import talis_cli.server.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 3 << 20)
    response = post(live.url, {"prompt": "x" * (4 << 20)})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "the request body is over 3 MiB; send a shorter prompt"


def test_unknown_path_and_method(live):
    response = httpx.get(live.url + "/v2/nothing", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == ("no such path: GET /v2/nothing; see GET /v1/models, "
                                                   "POST /v1/chat/completions")
    response = httpx.get(live.url + "/v1/completions", timeout=10)
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_api_key():
    served_key = "s3cret-key"
    with serve_embedded(api_key=served_key) as server:
        missing = post(server.url, {"prompt": PROMPT, "max_tokens": 2})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        assert "Authorization: Bearer KEY" in missing.json()["error"]["message"]
        wrong = post(server.url, {"prompt": PROMPT, "max_tokens": 2}, {"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # probes need no key
        good = OpenAI(base_url=server.url + "/v1", api_key=served_key, max_retries=0, timeout=30)
        assert good.completions.create(model="talis-default", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_queue_full_is_429():
    with serve_embedded(max_batch=1, max_queue=0) as server:
        assert post(server.url, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200  # a free row: it runs
        ids = server.state.served.prompt_ids(PROMPT)
        busy = server.scheduler.submit(ids, GREEDY.with_overrides(max_new_tokens=400))  # takes the only row
        response = post(server.url, {"prompt": PROMPT, "max_tokens": 2})
        busy.cancel()
        assert response.status_code == 429
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
        assert error["message"] == "0 requests are already waiting for a row (the most is 0); try again later"


@pytest.mark.parametrize("phase, words", [("loading", "still loading"), ("draining", "shutting down")])
def test_503_while_loading_or_draining(phase, words):
    with LiveServer() as server:  # no model: loading
        server.state.phase = phase
        health = httpx.get(server.url + "/health", timeout=10)
        response = post(server.url, {"prompt": PROMPT})
        for answer in (health, response):
            assert answer.status_code == 503 and answer.json()["error"]["code"] == phase
            assert words in answer.json()["error"]["message"]


def test_a_draining_scheduler_refuses_with_503():
    with serve_embedded() as server:
        server.scheduler.stop(0)  # what talis serve's signal handler starts
        response = post(server.url, {"prompt": PROMPT})
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining"


def test_the_drain_deadline_ends_a_stream_without_done():
    with serve_embedded() as server:
        submitted = watch_submits(server.scheduler)
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 400, "stream": True}) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    server.scheduler.stop(0)  # what talis serve does at the --drain-timeout deadline
        assert response.status_code == 200 and lines and "data: [DONE]" not in lines
        assert submitted[0].stats.finish_reason == "cancelled"


def test_metrics_count_requests_tokens_and_latencies(reference):
    text, _, tokens, ids = reference(PROMPT, max_tokens=5)
    with serve_embedded() as server:
        for stream in (False, True, False):
            post(server.url, {"prompt": PROMPT, "max_tokens": 5, "stream": stream}).raise_for_status()
        post(server.url, b"{oops")
        httpx.get(server.url + "/nowhere", timeout=10)
        scraped = httpx.get(server.url + "/metrics", timeout=10)
        assert scraped.headers["content-type"].startswith("text/plain")
        samples = metric_samples(scraped.text)
        assert samples['talis_requests_total{endpoint="/v1/completions",status="200"}'] == 3
        assert samples['talis_requests_total{endpoint="/v1/completions",status="400"}'] == 1
        assert samples['talis_requests_total{endpoint="other",status="404"}'] == 1
        assert samples["talis_prompt_tokens_total"] == 3 * len(ids)
        assert samples["talis_completion_tokens_total"] == 3 * tokens
        assert samples["talis_time_to_first_token_seconds_count"] == 3
        assert samples["talis_time_per_output_token_seconds_count"] == 3 * (tokens - 1)  # one per token after the first
        assert samples["talis_queue_depth"] == 0 and samples["talis_running_requests"] == 0
        assert any(line.startswith("POST /v1/completions 200 4+5 tokens ") for line in server.lines)


def watch_submits(scheduler) -> list:
    """The requests `scheduler` accepts from now on (its submit wrapped; `del scheduler.submit` unwraps it)."""
    submitted, original = [], scheduler.submit
    scheduler.submit = lambda *args, **kwargs: submitted.append(original(*args, **kwargs)) or submitted[-1]
    return submitted


def wait_done(request, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not request.done and time.monotonic() < deadline:
        time.sleep(0.02)
    return request.stats


def test_client_that_leaves_mid_stream_cancels_its_row(live):
    submitted = watch_submits(live.scheduler)
    try:
        with httpx.stream("POST", live.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}) as response:
            for count, _ in enumerate(response.iter_lines()):
                if count == 6:
                    break  # leaving the block closes the connection
    finally:
        del live.scheduler.submit
    stats = wait_done(submitted[0])
    assert stats.finish_reason == "cancelled" and stats.new_tokens < 400  # not eos/length: cancelled
    assert live.scheduler.running == 0


def test_client_that_leaves_before_a_whole_reply_cancels_its_row(live):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 500, "temperature": 0}).encode()
    submitted = watch_submits(live.scheduler)
    try:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 10
            while not submitted and time.monotonic() < deadline:
                time.sleep(0.005)
    finally:
        del live.scheduler.submit
    stats = wait_done(submitted[0])
    assert stats.finish_reason == "cancelled" and stats.new_tokens < 500
    assert live.scheduler.running == 0


def test_cors_origins_get_headers_on_answers_and_refusals():
    with LiveServer(api_key="k", cors_origins=("http://page.example",)) as server:
        preflight = httpx.options(server.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://page.example"
        refused = post(server.url, {"prompt": PROMPT}, {"Origin": "http://page.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://page.example"
        other = post(server.url, {"prompt": PROMPT}, {"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def test_page_at_root(live, monkeypatch, tmp_path):
    import talis_cli.server.app as app_module

    monkeypatch.setattr(app_module, "STATIC_DIR", tmp_path)
    missing = httpx.get(live.url + "/", timeout=10)
    assert missing.status_code == 404 and "has no web page" in missing.json()["error"]["message"]
    (tmp_path / "index.html").write_text("<title>talis</title>")
    page = httpx.get(live.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == "<title>talis</title>"


def test_a_bug_is_a_500_in_openais_shape(live, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(live.scheduler, "submit", broken)
    response = post(live.url, {"prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal error (RuntimeError); the server's log has the details",
                                        "type": "server_error", "param": None, "code": None}
    monkeypatch.undo()
    assert post(live.url, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200  # still serving


def test_a_conversation_renders_as_talis_chat_renders_it(client, live):
    """System prompt and earlier turns: the reply equals talis chat's for the same conversation."""
    from talis_cli.repl.session import ChatSession

    turns = [{"role": "user", "content": "Who made the heaven?"}, {"role": "assistant", "content": "The LORD."},
             {"role": "user", "content": "And the earth?"}]
    engine = Engine.load()
    session = ChatSession(engine, GREEDY.with_overrides(max_new_tokens=N), system="Answer as the prophets did.")
    session.messages = list(turns)
    ids = session.encode()
    expected = "".join(e.text for e in engine.generator.stream(ids, with_stops(session.config, session.template.stop)))
    done = client.chat.completions.create(model="talis-default", max_tokens=N, temperature=0, messages=[
        {"role": "system", "content": "Answer as the prophets did."}, *turns])
    assert done.choices[0].message.content == expected and done.usage.prompt_tokens == len(ids)

    import dataclasses

    from talis_cli.server.schemas import ChatMessage

    with_default = dataclasses.replace(live.state.served, system="Answer as the prophets did.")  # talis serve --system
    assert with_default.chat_ids([ChatMessage(**turn) for turn in turns]) == ids


def test_a_long_prompt_does_not_stall_the_event_loop(live):
    """Tokenizing runs off the event loop, and lets it run: while a 6 MB prompt is read and tokenized (seconds),
    /health keeps answering at once; the prompt is then refused with its token count."""
    import threading

    answers = {}
    body = {"prompt": "And God said unto Moses " * 250_000, "max_tokens": 1}
    sender = threading.Thread(target=lambda: answers.update(long=post(live.url, body)))
    sender.start()
    answered = [time.perf_counter()]  # the server runs in this process: a stall of it stalls this loop too
    while sender.is_alive():
        assert httpx.get(live.url + "/health", timeout=30).status_code == 200
        answered.append(time.perf_counter())
        time.sleep(0.05)
    sender.join()
    assert answers["long"].status_code == 400 and answers["long"].json()["error"]["code"] == "context_length_exceeded"
    slowest = max(b - a for a, b in zip(answered, answered[1:]))
    assert len(answered) > 5 and slowest < 0.5, f"/health answered {len(answered) - 1} times, {slowest:.2f} s apart"


def test_an_end_of_sequence_token_ends_the_reply_with_openais_stop():
    """A reply that draws an end-of-sequence token ends there with finish_reason "stop" (talis' "eos" in its
    timings), streaming or not, with the text the Generator gives. The embedded model never draws its own EOS greedily on this prompt, so its third
    greedy token is made an end-of-sequence id, in the reference engine and in the server alike."""
    engine = Engine.load()
    ids, _ = encode_prompt(engine, PROMPT, None, None, False)
    cfg = GREEDY.with_overrides(max_new_tokens=8)
    free = list(engine.generator.stream(ids, cfg))
    eos = free[2].token_ids[0]
    engine.generator.eos_ids = frozenset({eos})
    ended = list(engine.generator.stream(ids, cfg))
    assert ended[-1].finish_reason == "eos" and len(ended) < len(free)
    text = "".join(e.text for e in ended)
    with serve_embedded() as server:
        server.scheduler.generator.eos_ids = frozenset({eos})
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        whole = client.completions.create(model="talis-default", prompt=PROMPT, max_tokens=8, temperature=0)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, "stop")
        raw = post(server.url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
        assert raw["timings"]["finish_reason"] == "eos"  # talis' own reason beside OpenAI's
        short = post(server.url, {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}).json()
        assert (short["choices"][0]["finish_reason"], short["timings"]["finish_reason"]) == ("length", "length")
        chunks = list(client.completions.create(model="talis-default", prompt=PROMPT, max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "stop"
