"""A conversation as token ids: rendered through a chat template, or a one-shot prompt as plain text.

What the three frontends share (the CLI's one-shot, the REPL's ChatSession, the server): one rendering, so that a
conversation gives the same tokens whichever of them sends it. No terminal or HTTP code here.
"""

from typing import Optional

from talis_cli.chat_templates import resolve_template, special_token_strings


def render_chat(engine, template, system: Optional[str], messages: list) -> list:
    """Token ids of the conversation rendered by `template` (the text carries its own BOS). The messages and the
    system prompt are plain text: only the template's markup yields control tokens."""
    conversation = ([{"role": "system", "content": system}] if system else []) + list(messages)
    tokens = special_token_strings(engine.tokenizer)
    return engine.encode_chat(lambda protected: template.render(protected, **tokens), conversation)


def with_stops(config, stops) -> object:
    """`config` with the strings in `stops` added to its stop strings (a template's turn ends)."""
    extra = tuple(s for s in dict.fromkeys(stops) if s not in config.stop)
    return config.with_overrides(stop=tuple(config.stop) + extra) if extra else config


def encode_prompt(engine, text: str, system: Optional[str], template_spec: Optional[str], chat: bool,
                  special: bool = False) -> tuple:
    """(token ids, extra stop strings) for a one-shot prompt, wrapped in the chat template when `chat`.
    The prompt is plain text; a raw prompt (not `chat`) with `special` has its control-token text parsed."""
    if not chat:
        return engine.encode(text, add_bos=True, special=special), ()
    template = resolve_template(template_spec, engine.tokenizer)
    return render_chat(engine, template, system, [{"role": "user", "content": text}]), template.stop
