"""Chat templates: turn a conversation into the prompt text a model was trained on.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
Rendered text already holds the beginning-of-sequence token, so encode it without adding another.
Sources, in the order ``auto`` tries them: the tokenizer's own Jinja template, else ``raw``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from talis_cli.errors import UsageError

Messages = list  # list[dict[str, str]]
Renderer = Callable[[Messages, str, str], str]  # (messages, bos, eos) -> prompt text ending where the reply starts


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    render_text: Renderer
    stop: tuple = ()  # strings that end the assistant's reply besides the end-of-sequence token

    def render(self, messages: Messages, bos: str = "", eos: str = "") -> str:
        """Prompt text for `messages`, ending with the cue for the assistant's next reply."""
        return self.render_text(messages, bos, eos)


def _split_system(messages: Messages) -> tuple:
    """(system prompt or "", the remaining messages)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def _render_llama2(messages: Messages, bos: str, eos: str) -> str:
    system, turns = _split_system(messages)
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


def _render_llama3(messages: Messages, bos: str, eos: str) -> str:
    text = bos
    for message in messages:
        text += f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n{message['content'].strip()}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _render_chatml(messages: Messages, bos: str, eos: str) -> str:
    text = bos
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _render_raw(messages: Messages, bos: str, eos: str) -> str:
    """A plain log for base models: the system prompt as a preamble, then User:/Assistant: lines."""
    system, turns = _split_system(messages)
    text = bos + (f"{system.strip()}\n\n" if system else "")
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


def _jinja_renderer(source: str, origin: str) -> Renderer:
    """Compile a Jinja chat template in a sandbox (the variables HF templates use are provided)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        template = environment.from_string(source)
    except TemplateError as exc:
        raise UsageError(f"chat template {origin} does not compile: {exc}; fix the Jinja syntax") from None

    def render(messages: Messages, bos: str, eos: str) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except TemplateError as exc:
            raise UsageError(f"chat template {origin} failed: {exc}") from None

    return render


def _tokenizer_template(tokenizer) -> Optional[ChatTemplate]:
    """The tokenizer's own template (rendered by its apply_chat_template), or None when it ships none."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: Messages, bos: str, eos: str) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks raise (e.g. roles must alternate)
            raise UsageError(f"the tokenizer's chat template refused this conversation ({str(exc).splitlines()[0][:120]}); "
                             f"pick another with --template or /template (llama2, llama3, chatml, raw)") from None

    return ChatTemplate("tokenizer", render)


def check_template_spec(spec: Optional[str]) -> None:
    """Fail early (before a model loads) on a name that is neither a template nor an existing file."""
    if spec is None or spec in TEMPLATE_CHOICES or Path(spec).is_file():
        return
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
    return ChatTemplate(path.name, _jinja_renderer(path.read_text(encoding="utf-8"), str(path)))


def special_token_texts(tokenizer) -> tuple:
    """(bos, eos) strings of `tokenizer` ("" where it has none), to splice into rendered text."""
    return getattr(tokenizer, "bos_token", None) or "", getattr(tokenizer, "eos_token", None) or ""
