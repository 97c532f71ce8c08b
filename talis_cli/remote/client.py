"""HTTP client of `talis serve` (httpx): streamed completions and chat completions as TokenEvents, the server's
`timings` as GenerationStats, and every failure (server down, 401, 429, 400 ...) as one TalisError line.

The wire format is OpenAI's: a POST with `"stream": true` answers with server-sent events, one `data: {json}` line
per chunk (`choices[0].text` for completions, `choices[0].delta.content` for chat), ending with `data: [DONE]`;
the chunk that carries a `finish_reason` also carries talis' `timings` object.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

import httpx

from talis_cli.errors import TalisError, UsageError
from talis_cli.generation import GenerationConfig, GenerationStats, TokenEvent

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # the longest wait for the next chunk (a long prompt queued behind others on a busy server)
PER_PROMPT_STATUSES = (400, 422)  # the request itself was refused; another prompt may still run
SERVER_SIDE_SETTINGS = ("typical_p", "repetition_window")  # GenerationConfig fields the API does not take


class ServerError(TalisError):
    """The server answered with an error (or could not be reached: `status` None); the message is one line;
    `code` is the error body's machine-readable code (e.g. "context_length_exceeded"), if any."""

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def per_prompt(self) -> bool:
        """True when only this request was at fault (bad parameter, prompt longer than the context)."""
        return self.status in PER_PROMPT_STATUSES


def check_url(url: str) -> str:
    """`url` without a trailing slash (or /v1), or UsageError when it is not http(s)://HOST[:PORT][/path]."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must look like http://HOST:PORT (the address `talis serve` printed), got {url!r}")
    try:
        parts.port
    except ValueError:
        raise UsageError(f"--url has a bad port: {url!r}; e.g. http://127.0.0.1:8000") from None
    return url.strip().rstrip("/").removesuffix("/v1")


def request_parameters(cfg: GenerationConfig) -> dict:
    """The OpenAI request fields (and talis' own: top_k, min_p, repetition_penalty ...) for `cfg`.

    Every setting is sent, so a reply through the server is what the same settings give locally. typical_p and
    repetition_window are not request fields (the server's own settings apply): UsageError when they differ from
    their defaults, rather than a reply made with other settings than asked for.
    """
    defaults = GenerationConfig()
    for name in SERVER_SIDE_SETTINGS:
        if getattr(cfg, name) != getattr(defaults, name):
            raise UsageError(f"{name} is not a request setting of `talis serve` (start the server with "
                             f"--{name.replace('_', '-')} instead); set it back to {getattr(defaults, name)} "
                             "or leave it out")
    body = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if cfg.stop:
        body["stop"] = list(cfg.stop)
    return body


def stats_from_timings(timings: dict) -> GenerationStats:
    """GenerationStats from the server's `timings` object (milliseconds -> seconds; the prefill is the time to
    first token less the time the request waited in the queue)."""
    first = float(timings.get("time_to_first_token_ms", 0.0)) / 1000
    queued = float(timings.get("queued_ms", 0.0)) / 1000
    return GenerationStats(prompt_tokens=int(timings.get("prompt_tokens", 0)),
                           reused_tokens=int(timings.get("reused_tokens", 0)),
                           new_tokens=int(timings.get("completion_tokens", 0)),
                           prefill_s=max(first - queued, 0.0), decode_s=float(timings.get("decode_ms", 0.0)) / 1000,
                           first_token_s=first)


class Reply:
    """One streamed reply. Iterating yields TokenEvents (index 0; `token_ids` empty: the server sends text);
    the last one carries the finish reason: talis' own from the server's timings (eos, stop, length, context), else
    OpenAI's (stop or length). `stats` holds the server's timings
    once the reply has ended. Closing it early (`close()`, or leaving the `with` block) drops the connection,
    which cancels the request on the server."""

    def __init__(self, events: Callable[["Reply"], Iterator[TokenEvent]]):
        """events(reply): the generator of the reply's events, filling in `reply.stats` and `finish_reason`."""
        self.stats: Optional[GenerationStats] = None
        self.finish_reason: Optional[str] = None
        self._events = events(self)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "Reply":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServerClient:
    """A connection to `talis serve` at `url` (http://HOST:PORT), with `api_key` sent as a Bearer token.

    Thread-safe: `--each-line` streams several replies at once through one client. Every method raises
    ServerError (a TalisError: one line, exit 1) when the server is unreachable or answers with an error.
    `transport`: httpx's (tests give an httpx.MockTransport); by default a real connection.
    """

    def __init__(self, url: str, api_key: Optional[str] = None, connections: int = 8,
                 read_timeout_s: float = READ_TIMEOUT_S, transport: Optional[httpx.BaseTransport] = None):
        self.url = check_url(url)
        self.api_key = api_key or None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.read_timeout_s = read_timeout_s
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S),
                                  limits=httpx.Limits(max_connections=max(connections, 1)), transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- requests

    def model_id(self) -> str:
        """The id of the model the server runs (GET /v1/models); also checks that the server answers and takes
        the key."""
        with self._transport_errors():
            response = self._http.get("/v1/models")
        self._raise_for_status(response.status_code, response.content)
        try:
            return str(response.json()["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServerError(f"{self.url} did not answer GET /v1/models as `talis serve` does; check --url") from None

    def complete(self, prompt: str, cfg: GenerationConfig) -> Reply:
        """Stream the completion of the raw text `prompt` (POST /v1/completions; the server adds BOS as
        `talis generate` does)."""
        return self._stream("/v1/completions", {"prompt": prompt, **request_parameters(cfg)})

    def chat(self, messages: list, cfg: GenerationConfig) -> Reply:
        """Stream the assistant's reply to `messages` ([{"role", "content"}], system first if any), rendered by
        the server's chat template (POST /v1/chat/completions)."""
        return self._stream("/v1/chat/completions", {"messages": list(messages), **request_parameters(cfg)})

    # ----- streaming

    def _stream(self, path: str, body: dict) -> Reply:
        return Reply(lambda reply: self._events(path, {**body, "stream": True}, reply))

    def _events(self, path: str, body: dict, reply: Reply) -> Iterator[TokenEvent]:
        with self._transport_errors():
            with self._http.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as response:
                if response.status_code != 200:
                    self._raise_for_status(response.status_code, response.read())
                for chunk in self._chunks(response):
                    event = self._event(chunk, reply)
                    if event is not None:
                        yield event
        if reply.finish_reason is None:
            raise ServerError(f"the reply from {self.url} ended before it was complete; is `talis serve` still running?")

    def _chunks(self, response) -> Iterator[dict]:
        """The JSON objects of the `data:` lines, up to `data: [DONE]`."""
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (": ping"), event names, blank separators
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise ServerError(f"{self.url} sent a stream chunk that is not JSON: {data[:80]!r}") from None
            if isinstance(chunk, dict) and "error" in chunk:  # an error after the stream had started
                raise ServerError(f"the server stopped the reply: {_error_message(chunk)}", 500)
            yield chunk

    @staticmethod
    def _event(chunk: dict, reply: Reply) -> Optional[TokenEvent]:
        if isinstance(chunk.get("timings"), dict):
            reply.stats = stats_from_timings(chunk["timings"])
        choices = chunk.get("choices") or []
        if not choices:
            return None  # the usage chunk
        choice = choices[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        finish = choice.get("finish_reason")
        if finish is not None:  # talis' own reason where the server gives it (eos, context: not OpenAI's words)
            timings = chunk.get("timings")
            finish = (timings.get("finish_reason") if isinstance(timings, dict) else None) or finish
            reply.finish_reason = finish
        if not text and finish is None:
            return None  # a role-only first chunk
        return TokenEvent(0, text or "", [], finish)

    # ----- errors

    def _transport_errors(self):
        return _TransportErrors(self.url, self.read_timeout_s)

    def _raise_for_status(self, status: int, content: bytes) -> None:
        if status == 200:
            return
        code = None
        try:
            body = json.loads(content)
            message = _error_message(body)
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
        except ValueError:
            message = content.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
        if status == 401:
            action = ("check --api-key or TALIS_API_KEY" if self.api_key else
                      "pass the server's key with --api-key KEY or the TALIS_API_KEY variable")
            raise ServerError(f"the server at {self.url} refused the request (401 {message}); {action}", status)
        if status == 429:
            raise ServerError(f"the server at {self.url} is busy (429 {message}); try again in a moment", status)
        if status == 503:
            raise ServerError(f"the server at {self.url} is loading or shutting down (503 {message}); "
                              "try again once it is ready", status)
        if status == 404 and "/v1/" not in message:
            message += "; is --url the address of `talis serve`?"
        raise ServerError(f"the server refused the request ({status}): {message}", status, code)


def _error_message(body) -> str:
    """The message of an OpenAI-shaped error body {"error": {"message": ...}} (FastAPI's {"detail": ...} too)."""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict) and error.get("message"):
            return " ".join(str(error["message"]).split())
        if error:
            return " ".join(str(error).split())
    return " ".join(json.dumps(body).split())[:200]


class _TransportErrors:
    """Turns httpx's connection failures into one ServerError line."""

    def __init__(self, url: str, read_timeout_s: float):
        self.url, self.read_timeout_s = url, read_timeout_s

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return False
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            reason = str(exc).split("] ")[-1] or type(exc).__name__
            raise ServerError(f"cannot reach {self.url}: {reason}; is `talis serve` running?") from None
        if isinstance(exc, httpx.ReadTimeout):
            raise ServerError(f"{self.url} sent nothing for {self.read_timeout_s:.0f} s; the server may be stuck; "
                              "check its log") from None
        raise ServerError(f"the connection to {self.url} failed ({type(exc).__name__}: {exc}); "
                          "is `talis serve` still running?") from None
