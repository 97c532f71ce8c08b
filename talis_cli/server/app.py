"""The FastAPI app of `talis serve`: OpenAI-compatible completions over the engine's Scheduler.

A request's path: the front door (api key, loading/draining) -> pydantic body -> GenerationConfig (the server's
settings with the request's on top) -> token ids (the chat template as `talis chat` renders it, or the prompt text
as `talis generate` encodes it) -> Scheduler.submit, whose events come back from the scheduler thread through
loop.call_soon_threadsafe into an asyncio queue -> one JSON body or SSE chunks. A client that leaves cancels its
request; the scheduler drops the row at its next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from talis_cli.conversation import render_chat, with_stops
from talis_cli.errors import TalisError, UsageError

from .errors import (APIError, api_error_handler, error_response, http_exception_handler, internal_error_handler,
                     validation_exception_handler, validation_message)
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, generation_config

STATIC_DIR = Path(__file__).parent / "static"
EMBEDDED_MODEL_ID = "talis-default"
MAX_BODY_BYTES = 32 << 20  # far above any context's worth of text; a bound on what one request may make us hold
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's


@dataclass
class ServedModel:
    """What the endpoints need of a loaded model: the engine, its scheduler, and the server's settings."""

    engine: object  # talis_cli.engine.Engine
    scheduler: object  # talis_cli.scheduler.Scheduler, started
    model_id: str  # GET /v1/models' id: the model folder's name, or EMBEDDED_MODEL_ID
    config: object  # GenerationConfig: the server's defaults (preset, flags)
    template: object  # the chat template (talis_cli.chat_templates), resolved at load
    system: str | None = None  # the server's --system, for chats that bring none
    created: int = 0  # Unix time of the load (GET /v1/models)

    def chat_ids(self, messages: list) -> list[int]:
        """Token ids of a conversation, rendered exactly as `talis chat` renders it (contents are plain text)."""
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        system = self.system if not any(turn["role"] == "system" for turn in turns) else None
        return render_chat(self.engine, self.template, system, turns)

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a raw prompt, BOS as `talis generate` adds it."""
        return self.engine.encode(text, add_bos=True)


class ServerState:
    """The server's phase ("loading" | "ready" | "draining"), its model once loaded, the api key and metrics."""

    def __init__(self, api_key: str | None = None, log=None):
        self.phase = "loading"
        self.served: ServedModel | None = None
        self.api_key = api_key
        self.metrics = ServerMetrics(lambda: self.served.scheduler if self.served else None)
        self.log = log if log is not None else _log_to_stderr

    def ready(self, served: ServedModel) -> None:
        self.served, self.phase = served, "ready"

    def refusal(self, scope) -> Response | None:
        """The answer to a /v1/ request that must not reach the model (no or wrong key, loading, draining)."""
        if self.api_key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return error_response(401, "missing API key: send the header 'Authorization: Bearer KEY' with the "
                                           "key talis serve was started with (--api-key or TALIS_API_KEY)",
                                      code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return error_response(401, "invalid API key: it differs from the key talis serve was started with",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if self.phase != "ready":
            return unavailable(self.phase)
        return None


def unavailable(phase: str) -> JSONResponse:
    message = ("the model is still loading; retry when GET /health answers 200" if phase == "loading"
               else "the server is shutting down and takes no new requests")
    return error_response(503, message, code=phase, headers={"Retry-After": "1"})


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class FrontDoor:
    """ASGI middleware: the api key and phase checks of /v1/, and per request one log line and the request counter
    (method, path, status, tokens, milliseconds), also for streams the client left."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        seen = scope["talis"] = {"status": 500, "stats": None}

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        refusal = self.state.refusal(scope) if scope["path"].startswith("/v1/") else None
        try:
            await (refusal or self.app)(scope, receive, send_noting_status)
        finally:
            self.state.metrics.count_request(scope["path"], seen["status"])
            stats = seen["stats"]
            tokens = f" {stats.prompt_tokens}+{stats.new_tokens} tokens" if stats is not None else ""
            ms = (time.perf_counter() - started) * 1000
            self.state.log(f"{scope['method']} {scope['path']} {seen['status']}{tokens} {ms:.0f} ms")


def create_app(state: ServerState, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The app serving `state` (its model may still be loading: /v1/ answers 503 until `state.ready()`).

    cors_origins: browser origins allowed to call the API (none by default; the page at / is same-origin)."""
    app = FastAPI(title="talis", docs_url=None, redoc_url=None, openapi_url=None)
    # Prompts are tokenized off the event loop (a long one takes seconds, which would stall every stream and
    # /health), on one thread: PromptEncoder.plain flips a flag on the shared tokenizer for each call.
    tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="talis-tokenize")
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_exception_handler)
    app.add_exception_handler(Exception, internal_error_handler)  # a bug: the body still in OpenAI's shape
    app.add_middleware(FrontDoor, state=state)
    if cors_origins:  # outermost, so that refusals carry the CORS headers a page needs to read them
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/")
    async def page():
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise APIError(404, "this install has no web page (talis_cli/server/static/index.html)")
        return FileResponse(index, media_type="text/html")

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"}) if state.phase == "ready" else unavailable(state.phase)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(state.served)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        served_model(state, model_id)
        return model_card(state.served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, ChatCompletionRequest)
        served = served_model(state, body.model)
        config = generation_config(served.config, body)
        ids = await encode(tokenizing, lambda: served.chat_ids(body.messages), "messages")
        return await complete(state, request, served, ids, with_stops(config, served.template.stop), body, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        served = served_model(state, body.model)
        config = generation_config(served.config, body)
        ids = await encode(tokenizing, lambda: served.prompt_ids(body.prompt), "prompt")
        return await complete(state, request, served, ids, config, body, "text")

    return app


async def read_body(request: Request, schema):
    """The request's JSON body (whatever its Content-Type says) as `schema`; APIError 400 for malformed JSON or a
    field of the wrong type, naming the field; 413 for a body over MAX_BODY_BYTES."""
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt")
    try:
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except ValueError as exc:  # also bytes that are not UTF-8
        raise APIError(400, f"the request body is not valid JSON ({exc}); send one JSON object") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise APIError(400, message, param) from None


def _not_json(constant: str):
    """Python's json reads NaN, Infinity and -Infinity; JSON has no such numbers (a temperature of Infinity
    would sample uniformly at random)."""
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number as a float; 1e400 and the like would read as infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large a number")
    return value


def served_model(state: ServerState, model_id: str | None) -> ServedModel:
    """The loaded model, when `model_id` is None or its id; APIError 404 otherwise."""
    served = state.served
    if model_id is not None and model_id != served.model_id:
        raise APIError(404, f"model '{model_id}' does not exist here; this server serves '{served.model_id}' "
                            "(GET /v1/models)", "model", "model_not_found")
    return served


def model_card(served: ServedModel) -> dict:
    return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "talis"}


async def encode(pool: concurrent.futures.Executor, make_ids, param: str) -> list[int]:
    """Token ids from `make_ids`, run on `pool` (not on the event loop); a template or tokenizer error as a 400
    naming `param`."""
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, make_ids)
    except TalisError as exc:
        raise APIError(400, str(exc), param) from None


async def complete(state: ServerState, request: Request, served: ServedModel, ids: list[int], config, body,
                   kind: str):
    """Submit the prompt and answer with one JSON body, or SSE chunks when `body.stream`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    noted = request.scope.get("talis", {})

    def deliver(req, event):  # on the event loop
        events.put_nowait(event)
        if event.finish_reason is not None:  # the stats are final with the last event
            state.metrics.observe_completion(req.stats)

    parts: list[str] = []  # a non-streaming reply's text, gathered on the scheduler thread
    previous = [None]  # perf_counter of the request's last token event

    def listener(req, event):  # on the scheduler thread: must not block
        if event.token_ids:
            now = time.perf_counter()
            if previous[0] is not None:
                state.metrics.observe_token_gap(now - previous[0])
            previous[0] = now
        if not body.stream and event.finish_reason is None:
            parts.append(event.text)  # the loop wakes only for the last event, not once per token
            return
        try:
            loop.call_soon_threadsafe(deliver, req, event)
        except RuntimeError:  # the loop has closed (the server stopped before the scheduler): nobody listens
            pass

    param = "messages" if kind == "chat" else "prompt"
    req = submit(served.scheduler, ids, config, listener, param)
    noted["stats"] = req.stats
    reply = Reply(req, served.model_id, kind)
    if body.stream:
        return StreamingResponse(stream_chunks(reply, events, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await whole_reply(request, reply, events, parts)


async def whole_reply(request: Request, reply: "Reply", events: asyncio.Queue, parts: list[str]) -> Response:
    """The non-streaming answer once the last event (the only one `events` gets) is in; `parts`: the text before it.
    The request is cancelled when the client leaves."""
    req, left = reply.req, asyncio.Event()

    async def cancel_when_the_client_leaves():  # the body is read: what receive() gives now is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left.set()
        req.cancel()

    watcher = asyncio.create_task(cancel_when_the_client_leaves())
    last = None
    try:
        last = await events.get()
    finally:
        watcher.cancel()
        if last is None:
            req.cancel()
    if last.finish_reason == "cancelled":  # the client left (nobody reads this), or the server's drain
        return Response(status_code=499) if left.is_set() else unavailable("draining")
    if last.finish_reason == "error":
        return error_response(500, model_failure(req), code="model_error")
    return JSONResponse(reply.whole("".join(parts) + last.text, last.finish_reason))


def model_failure(req) -> str:
    """The message of a request the model failed on mid-generation (scheduler finish reason "error")."""
    return f"the model failed while generating this reply ({req.error}); the server's log has the details"


def submit(scheduler, ids: list[int], config, listener, param: str):
    """scheduler.submit with its refusals as HTTP errors."""
    from talis_cli.scheduler import Draining, QueueFull

    try:
        return scheduler.submit(ids, config, listener=listener)
    except QueueFull as exc:
        raise APIError(429, str(exc), code="queue_full") from None
    except Draining:
        raise APIError(503, "the server is shutting down and takes no new requests", code="draining") from None
    except UsageError as exc:
        raise APIError(400, str(exc)) from None
    except TalisError as exc:  # the prompt does not fit the context (Generator.check_prompt)
        code = "context_length_exceeded" if ids else None
        raise APIError(400, str(exc), param, code) from None


class Reply:
    """The OpenAI-shaped bodies of one request's answer (chat or text completion)."""

    def __init__(self, req, model_id: str, kind: str):
        self.req, self.model_id, self.kind = req, model_id, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _body(self, object_name: str, choices: list) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id,
                "choices": choices}

    def whole(self, text: str, finish: str) -> dict:
        """The non-streaming body."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": FINISH_REASONS[finish]}
            body = self._body("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH_REASONS[finish]}
            body = self._body("text_completion", [choice])
        return {**body, "usage": usage(self.req.stats), "timings": timings(self.req.stats)}

    def chunk(self, text: str | None, finish: str | None = None) -> dict:
        """A streamed chunk: `text` (None: the chat's opening chunk with the role), and the finish reason."""
        reason = FINISH_REASONS[finish] if finish else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return self._body("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": reason}])
        return self._body("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                               "finish_reason": reason}])

    def usage_chunk(self) -> dict:
        return {**self._body("chat.completion.chunk" if self.kind == "chat" else "text_completion", []),
                "usage": usage(self.req.stats), "timings": timings(self.req.stats)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chunks(reply: Reply, events: asyncio.Queue, include_usage: bool):
    """SSE chunks of one request; the request is cancelled when the client leaves (the generator is closed).
    Events that queued up while the loop was busy go out in one write."""
    req = reply.req
    try:
        if reply.kind == "chat":
            yield sse(reply.chunk(None))
        while True:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            out = []
            for event in batch:
                if event.finish_reason == "cancelled":  # the server's drain ended it: nothing more to send
                    if out:
                        yield "".join(out)
                    return
                if event.finish_reason is None:
                    if event.text:
                        out.append(sse(reply.chunk(event.text)))
                    continue
                if event.finish_reason == "error":  # OpenAI's way: an error object as the stream's last event
                    out.append(sse({"error": {"message": model_failure(req), "type": "server_error", "param": None,
                                              "code": "model_error"}}))
                    yield "".join(out)
                    return
                out += final_chunks(reply, event, include_usage)
                yield "".join(out)
                return
            if out:
                yield "".join(out)
    finally:
        if not req.done:
            req.cancel()


def final_chunks(reply: Reply, event, include_usage: bool) -> list[str]:
    """The chunk with the finish reason (and timings), the usage chunk when asked for, and [DONE]."""
    stats = reply.req.stats
    last = reply.chunk(event.text, event.finish_reason)
    if include_usage:  # OpenAI's way: usage null on the others, then a chunk with no choices and the usage
        return [sse({**last, "usage": None, "timings": timings(stats)}), sse(reply.usage_chunk()), sse("[DONE]")]
    return [sse({**last, "usage": usage(stats), "timings": timings(stats)}), sse("[DONE]")]


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def timings(stats) -> dict:
    """talis' non-standard `timings` (milliseconds; decode rate over the tokens after the first), and talis' own
    finish reason (eos | stop | length | context | cancelled), which OpenAI's finish_reason folds into stop and
    length."""
    rate = (stats.new_tokens - 1) / stats.decode_s if stats.new_tokens > 1 and stats.decode_s > 0 else 0.0
    return {"finish_reason": stats.finish_reason, "prompt_tokens": stats.prompt_tokens,
            "reused_tokens": stats.reused_tokens,
            "completion_tokens": stats.new_tokens, "queued_ms": round(stats.queued_s * 1000, 3),
            "time_to_first_token_ms": round(stats.first_token_s * 1000, 3),
            "decode_ms": round(stats.decode_s * 1000, 3), "decode_tokens_per_s": round(rate, 3)}
