"""A bounded load test of the server: 200 requests from 16 concurrent clients mixing plain and streaming
completions and chats, streams cancelled midway, malformed JSON, prompts over the context and wrong keys.

The server stays up; every well-formed request gets the greedy text the same prompt gives alone; the process' RSS
after the last request is within RSS_TOLERANCE of what it was after the first 50; /metrics counts add up."""

import asyncio
import json
import time

import httpx

from talis_cli.engine import Engine
from talis_cli.repl.session import encode_prompt, with_stops

from server_harness import GREEDY, metric_samples, serve_embedded

REQUESTS, CLIENTS, MAX_TOKENS = 200, 16, 6
KEY = "load-test-key"
PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are they", "And Jesus answered",
           "Thus saith the LORD"]
RSS_TOLERANCE = 24 * 2**20  # bytes: allocator noise of Python and torch, far below a leak of 200 requests' state
KINDS = ["text", "chat", "text", "chat", "text", "stream-text", "stream-chat", "cancel", "bad", "wrong-key"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def job(i: int) -> dict:
    kind, prompt = KINDS[i % len(KINDS)], PROMPTS[i % len(PROMPTS)]
    chat = kind in ("chat", "stream-chat") or (kind == "cancel" and i % 20 == 7)
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": kind.startswith("stream") or kind == "cancel"}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if kind == "cancel":
        body["max_tokens"] = 200
    content = json.dumps(body).encode()
    if kind == "bad":  # alternately malformed JSON and a prompt over the context
        content = content[:-3] if i % 20 == 8 else json.dumps({"prompt": "And God said " * 200}).encode()
    return {"i": i, "kind": kind, "prompt": prompt, "chat": chat, "content": content,
            "path": "/v1/chat/completions" if chat else "/v1/completions",
            "key": "not-the-key" if kind == "wrong-key" else KEY}


def references() -> dict:
    """(prompt, chat) -> greedy text alone, from an engine of the test's own."""
    engine, found = Engine.load(), {}
    for prompt in PROMPTS:
        for chat in (False, True):
            ids, stops = encode_prompt(engine, prompt, None, None, chat)
            cfg = with_stops(GREEDY.with_overrides(max_new_tokens=MAX_TOKENS), stops)
            found[prompt, chat] = "".join(event.text for event in engine.generator.stream(ids, cfg))
    return found


async def send(client: httpx.AsyncClient, task: dict) -> dict:
    headers = {"Authorization": f"Bearer {task['key']}", "Content-Type": "application/json"}
    if '"stream": true' not in task["content"].decode() or task["kind"] == "bad":
        response = await client.post(task["path"], content=task["content"], headers=headers)
        body = response.json()
        text = None
        if response.status_code == 200:
            choice = body["choices"][0]
            text = choice["message"]["content"] if task["chat"] else choice["text"]
        return {**task, "status": response.status_code, "body": body, "text": text}
    parts, chunks = [], 0
    async with client.stream("POST", task["path"], content=task["content"], headers=headers) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            choice = json.loads(line[6:])["choices"][0]
            parts.append((choice["delta"].get("content") if task["chat"] else choice["text"]) or "")
            if task["kind"] == "cancel" and chunks == 3:
                break  # leaving the block closes the connection mid-stream
        return {**task, "status": response.status_code, "text": "".join(parts)}


async def drive(url: str) -> tuple[list, dict]:
    pending = [job(i) for i in range(REQUESTS)]
    results, rss = [], {}
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=CLIENTS)) as client:
        async def worker():
            while pending:
                results.append(await send(client, pending.pop(0)))
                if len(results) == 50:
                    rss["first 50"] = rss_bytes()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CLIENTS))), 120)
    rss["last 50"] = rss_bytes()
    return results, rss


def test_200_requests_from_16_clients():
    expected = references()
    with serve_embedded(api_key=KEY) as server:
        submitted, original = [], server.scheduler.submit
        server.scheduler.submit = lambda *a, **k: submitted.append(original(*a, **k)) or submitted[-1]
        results, rss = asyncio.run(drive(server.url))
        deadline = time.monotonic() + 10
        while not all(r.done for r in submitted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # still up
        samples = metric_samples(httpx.get(server.url + "/metrics", timeout=10).text)
        assert server.scheduler.running == 0 and server.scheduler.queue_depth == 0

    assert len(results) == REQUESTS
    by_kind = {}
    for result in results:
        by_kind.setdefault(result["kind"], []).append(result)
    for result in results:
        kind = result["kind"]
        if kind in ("text", "chat", "stream-text", "stream-chat"):
            assert result["status"] == 200 and result["text"] == expected[result["prompt"], result["chat"]], result
        elif kind == "cancel":
            assert result["status"] == 200
        elif kind == "wrong-key":
            assert result["status"] == 401 and result["body"]["error"]["code"] == "invalid_api_key"
        else:
            code = result["body"]["error"]["code"]
            assert result["status"] == 400 and code == (None if result["i"] % 20 == 8 else "context_length_exceeded")

    cancelled = [r for r in submitted if r.stats.finish_reason == "cancelled"]
    assert len(cancelled) == len(by_kind["cancel"]) == 20
    assert all(r.stats.new_tokens < 200 for r in cancelled)
    assert rss["last 50"] - rss["first 50"] < RSS_TOLERANCE, rss

    def count(status: int) -> float:
        return sum(samples.get(f'talis_requests_total{{endpoint="{path}",status="{status}"}}', 0)
                   for path in ("/v1/completions", "/v1/chat/completions"))

    assert (count(200), count(400), count(401)) == (160, 20, 20)
    assert samples["talis_prompt_tokens_total"] == sum(r.stats.prompt_tokens for r in submitted)
    assert samples["talis_completion_tokens_total"] == sum(r.stats.new_tokens for r in submitted)
    assert len(submitted) == 160 and sum(r.stats.new_tokens for r in submitted if r not in cancelled) == 140 * MAX_TOKENS
    assert samples["talis_time_to_first_token_seconds_count"] == sum(1 for r in submitted if r.stats.new_tokens)
