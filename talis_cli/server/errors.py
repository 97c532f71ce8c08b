"""Errors of the HTTP API in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause (bad JSON, a wrong type, a setting out of range, a missing key, an unknown model or
path, a full queue, a draining server) leaves through `APIError` or one of the handlers here, never as a traceback.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

# HTTP status -> OpenAI's error type for it
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A client-facing error: HTTP `status`, one-line `message`, the request field it concerns (`param`) and a
    machine-readable `code` (e.g. "context_length_exceeded")."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The JSON response of an error (type from the status)."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# fields of more than one type, in words (pydantic reports each alternative apart)
UNION_WORDS = {"stop": "a string or a list of strings", "content": "a string, a list of text parts or null"}


def validation_message(errors: list) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's validation errors: a missing field or one of the wrong type,
    named by its dotted path (``messages.0.content``)."""
    first = errors[0]
    kind = first.get("type", "")
    # drop the alternatives' tags pydantic puts in the path of a union ('stop', 'list[str]', 0)
    path = [str(part) for part in first.get("loc", ()) if part != "body"]
    union_at = next((i for i, part in enumerate(path) if part in UNION_WORDS), None)
    param = ".".join(path[: union_at + 1] if union_at is not None else path) or None
    if param is None:
        return f"the request body must be one JSON object ({first.get('msg', kind).lower()})", None
    if kind == "missing":
        return f"{param} is required", param
    if union_at is not None:
        return f"{param} must be {UNION_WORDS[path[union_at]]}", param
    return f"{param}: {first.get('msg', kind).lower()}", param


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown path (404), wrong method (405) and the like, in the same body shape."""
    if exc.status_code == 404:
        message = f"no such path: {request.method} {request.url.path}; see GET /v1/models, POST /v1/chat/completions"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def validation_exception_handler(request: Request, exc) -> JSONResponse:
    """Malformed JSON and wrong types: 400 (as OpenAI answers them), naming the field."""
    message, param = validation_message(exc.errors())
    return error_response(400, message, param)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug in talis: 500 in the same body shape (the traceback goes to the server's log, not to the client)."""
    return error_response(500, f"internal error ({type(exc).__name__}); the server's log has the details")
