"""Chat templates: turn a conversation into the prompt text a model was trained on.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
Rendered text already holds the beginning-of-sequence token, so encode it without adding another.
Sources, in the order ``auto`` tries them: the tokenizer's own Jinja template, else ``raw``.
"""

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from talis_cli.errors import UsageError

Messages = list  # list[dict[str, str]]
# (messages, special-token strings {"bos_token": ..., "eos_token": ...}) -> prompt text ending where the reply starts
Renderer = Callable[[Messages, dict], str]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    render_text: Renderer
    stop: tuple = ()  # strings that end the assistant's reply besides the end-of-sequence token
    defaults: dict = field(default_factory=dict)  # special-token strings used where render() is given none

    def render(self, messages: Messages, bos: str = "", eos: str = "", **tokens: str) -> str:
        """Prompt text for `messages`, ending with the cue for the assistant's next reply. `bos`, `eos` and
        `tokens` (unk_token, pad_token ...) are the special-token strings the template may write."""
        given = {"bos_token": bos, "eos_token": eos, **tokens}
        return self.render_text(messages, {"bos_token": "", "eos_token": "", **self.defaults,
                                           **{k: v for k, v in given.items() if v}})


def _split_system(messages: Messages) -> tuple:
    """(system prompt or "", the remaining messages)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def _render_llama2(messages: Messages, tokens: dict) -> str:
    system, turns = _split_system(messages)
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    text, first_user = "", True
    for message in turns:
        content = message["content"].strip()
        if message["role"] == "user":
            if first_user and system:  # Llama-2-chat folds the system prompt into the first instruction
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            first_user = False
            text += f"{bos}[INST] {content} [/INST]"
        else:
            text += f" {content} {eos}"
    return text


def _render_llama3(messages: Messages, tokens: dict) -> str:
    text = tokens["bos_token"]
    for message in messages:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n{message['content'].strip()}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _render_chatml(messages: Messages, tokens: dict) -> str:
    text = tokens["bos_token"]
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _render_raw(messages: Messages, tokens: dict) -> str:
    """A plain log for base models: the system prompt as a preamble, then User:/Assistant: lines."""
    system, turns = _split_system(messages)
    text = tokens["bos_token"] + (f"{system.strip()}\n\n" if system else "")
    for message in turns:
        speaker = "User" if message["role"] == "user" else "Assistant"
        text += f"{speaker}: {message['content'].strip()}\n"
    return text + "Assistant:"


BUILTIN_TEMPLATES = {
    "llama2": ChatTemplate("llama2", _render_llama2),
    "llama3": ChatTemplate("llama3", _render_llama3, stop=("<|eot_id|>",)),
    "chatml": ChatTemplate("chatml", _render_chatml, stop=("<|im_end|>",)),
    "raw": ChatTemplate("raw", _render_raw, stop=("User:",)),
}
TEMPLATE_CHOICES = ("auto", "tokenizer", *BUILTIN_TEMPLATES)


def raise_exception(message):
    """Templates call raise_exception('...') to refuse a conversation (roles must alternate ...)."""
    from jinja2 import TemplateError

    raise TemplateError(message)


def strftime_now(format: str) -> str:
    """The local time formatted by strftime (Llama-3.1 templates write today's date)."""
    from datetime import datetime

    return datetime.now().strftime(format)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON text of `value`, with json.dumps' arguments and no HTML escaping (unlike Jinja's own filter)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=None)
def jinja_environment():
    """The one sandboxed Jinja environment of every chat template (the tokenizer's own and --template files):
    what transformers' apply_chat_template gives a template: trim_blocks, lstrip_blocks, loop controls
    ({% break %}, {% continue %}), raise_exception, strftime_now, tojson with its arguments, and
    {% generation %} blocks (rendered as their body)."""
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}  # marks assistant text for training masks; rendering needs only its body

        def parse(self, parser) -> list:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols, GenerationBlock])
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    environment.filters["tojson"] = tojson
    return environment


def _jinja_renderer(source: str, origin: str, refused: Callable[[str], str]) -> Renderer:
    """Compile a Jinja chat template in the shared environment; `refused(reason)` words a rendering error."""
    from jinja2 import TemplateError

    try:
        template = jinja_environment().from_string(source)
    except TemplateError as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise UsageError(f"chat template {origin} does not compile: {reason}; fix the Jinja syntax") from None

    def render(messages: Messages, tokens: dict) -> str:
        try:
            # tools and documents are passed as None, as transformers does (templates test `tools is not none`)
            return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                   **tokens)
        except Exception as exc:  # the template's own checks raise (e.g. roles must alternate), as can its code
            raise UsageError(refused((str(exc).splitlines() or [""])[0][:160])) from None

    return render


def _tokenizer_template(tokenizer) -> Optional[ChatTemplate]:
    """The tokenizer's own template, rendered in the shared environment, or None when it ships none."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # named templates: the default one
        source = source.get("default")
    if not source:
        return None
    refused = (lambda reason: f"the tokenizer's chat template refused this conversation ({reason}); "
                              f"pick another with --template or /template (llama2, llama3, chatml, raw)")
    return ChatTemplate("tokenizer", _jinja_renderer(source, "of the tokenizer", refused),
                        defaults=special_token_strings(tokenizer))


def check_template_spec(spec: Optional[str]) -> None:
    """Fail early (before a model loads) on a name that is neither a template nor an existing file."""
    if spec is None or spec in TEMPLATE_CHOICES or Path(spec).is_file():
        return
    if "/" in spec or spec.endswith((".jinja", ".j2", ".jinja2")):  # meant as a file
        raise UsageError(f"chat template file {spec} does not exist: check --template")
    raise UsageError(f"unknown chat template '{spec}': use one of {', '.join(TEMPLATE_CHOICES)} or a Jinja file")


def resolve_template(spec: Optional[str], tokenizer) -> ChatTemplate:
    """The template named by `spec` (None = "auto": the tokenizer's own, else raw), a built-in, or a Jinja file."""
    check_template_spec(spec)
    if spec in (None, "auto"):
        return _tokenizer_template(tokenizer) or BUILTIN_TEMPLATES["raw"]
    if spec == "tokenizer":
        own = _tokenizer_template(tokenizer)
        if own is None:
            raise UsageError("this model's tokenizer has no chat template: pick one of llama2, llama3, chatml, raw")
        return own
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    refused = lambda reason: f"chat template {path} failed: {reason}"  # noqa: E731
    return ChatTemplate(path.name, _jinja_renderer(path.read_text(encoding="utf-8"), str(path), refused))


def special_token_strings(tokenizer) -> dict:
    """The tokenizer's named special tokens as template variables ({"bos_token": "<s>", "eos_token": "</s>",
    ...}), as transformers passes them to a chat template."""
    return dict(getattr(tokenizer, "special_tokens_map", None) or {})
