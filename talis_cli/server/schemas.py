"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their mapping onto GenerationConfig.

Types are strict (a string where a number belongs is a 400 naming the field); ranges are talis' own
(GenerationConfig.validate), so the server and the CLI allow the same values and say so in the same words.
Fields OpenAI defines that talis has no use for (``user``, ``logprobs`` ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from talis_cli.errors import UsageError

from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # one more chunk before [DONE] with `usage` (and `timings`)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None  # None: an assistant turn with nothing to say

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _Sampling(_Body):
    """What both endpoints share: the OpenAI sampling parameters and talis' own."""

    model: Optional[str] = None  # when given, the served model's id (GET /v1/models), else 404
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    n: Optional[int] = None  # only 1
    user: Optional[str] = None  # ignored
    top_k: Optional[int] = None  # talis' own, beyond OpenAI's
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None

    def overrides(self) -> dict:
        """{request field: (GenerationConfig field, value)} of the sampling settings given."""
        values = {"max_tokens": ("max_new_tokens", self.max_tokens), "temperature": ("temperature", self.temperature),
                  "top_p": ("top_p", self.top_p), "seed": ("seed", self.seed),
                  "frequency_penalty": ("frequency_penalty", self.frequency_penalty),
                  "presence_penalty": ("presence_penalty", self.presence_penalty), "top_k": ("top_k", self.top_k),
                  "min_p": ("min_p", self.min_p), "repetition_penalty": ("repetition_penalty", self.repetition_penalty),
                  "stop": ("stop", [self.stop] if isinstance(self.stop, str) else self.stop)}
        return {field: pair for field, pair in values.items() if pair[1] is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens; wins when both are given

    def overrides(self) -> dict:
        found = super().overrides()
        if self.max_completion_tokens is not None:
            found.pop("max_tokens", None)
            found["max_completion_tokens"] = ("max_new_tokens", self.max_completion_tokens)
        return found


class CompletionRequest(_Sampling):
    prompt: str


def generation_config(base, body: _Sampling):
    """`base` (the server's settings) with the request's settings on top, validated.

    APIError 400 naming the request's field and the allowed range, in GenerationConfig.validate's words."""
    if body.n is not None and body.n != 1:
        raise APIError(400, f"n = {body.n} is not supported: talis returns one choice per request (n = 1)", "n")
    config = base
    for field, (name, value) in body.overrides().items():
        try:
            config = config.with_overrides(**{name: value})
        except UsageError as exc:
            message = str(exc)  # "max_new_tokens = 0 is out of range: ..." -> the request's own field name
            raise APIError(400, field + message[len(name):] if message.startswith(name) else message, field) from None
    return config
