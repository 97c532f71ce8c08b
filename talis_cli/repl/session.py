"""A conversation with a loaded engine: messages, system prompt, template, generation settings, transcripts.

No terminal code here: the REPL drives a ChatSession and shows what it returns.
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from talis_cli.chat_templates import resolve_template
from talis_cli.conversation import encode_prompt, render_chat, with_stops  # noqa: F401  (their old home)
from talis_cli.errors import TalisError, UsageError
from talis_cli.wording import context_advice

TRANSCRIPT_VERSION = 1


@dataclass
class Reply:
    text: str
    finish_reason: str  # "eos" | "stop" | "length" | "context" (the context filled up) | "interrupted"
    stats: object  # GenerationStats of the reply (partial when interrupted)
    dropped: int = 0  # oldest exchanges dropped while replying (a server's context; local chat drops before)


class ChatSession:
    """The state of one chat: what `/save` writes and what every reply is generated from."""

    local = True  # replies come from a model loaded in this process (talis_cli.remote.chat: from a server)

    def __init__(self, engine, config, template_spec: Optional[str] = None, system: Optional[str] = None,
                 preset: Optional[str] = None, warm_up=None):
        self.engine = engine
        self.warm_up = warm_up  # a started warm_up.BackgroundWarmUp of the engine's generator, waited for at reply
        self.config = config  # GenerationConfig
        self.preset = preset
        self.template_spec = template_spec
        self.template = resolve_template(template_spec, engine.tokenizer)
        self.system = system
        self.messages: list = []  # {"role": "user" | "assistant", "content": str}, oldest first
        self.last_stats = None
        self._context = (None, 0)  # (what was rendered, its token count): context_used's cache

    # ----- what the REPL shows

    @property
    def model_name(self) -> str:
        return Path(str(self.engine.model_dir)).name

    @property
    def model_dir(self):
        """The model folder (for `/preset model`)."""
        return self.engine.model_dir

    @property
    def context_size(self) -> int:
        """Tokens the context holds (--max-seq-len)."""
        return self.engine.max_seq_len

    # ----- settings

    def set_template(self, spec: str) -> None:
        self.template = resolve_template(spec, self.engine.tokenizer)
        self.template_spec = spec

    # ----- conversation

    def encode(self) -> list:
        return render_chat(self.engine, self.template, self.system, self.messages)

    @property
    def context_used(self) -> int:
        """Tokens of the conversation as it stands (system prompt, every message, rendered by the template):
        what the next prompt starts with. The one measure of the toolbar and /stats, so it follows every change
        (a reply, /undo, /clear, /load, /system, /template) and is the same before /save and after /load."""
        key = (self.template, self.system, tuple((m["role"], m["content"]) for m in self.messages))
        if self._context[0] != key:  # the toolbar asks at every redraw: render only after a change
            self._context = (key, len(self.encode()) if self.messages or self.system else 0)
        return self._context[1]

    def fit_to_context(self) -> tuple:
        """(prompt ids, turns dropped): drop the oldest turns until the prompt leaves room for a reply.

        The system prompt and the newest user message always stay; when those alone do not fit, TalisError.
        """
        limit = self.engine.max_seq_len
        budget = limit - min(self.config.max_new_tokens, limit // 2)  # context kept free for the reply
        ids, dropped = self.encode(), 0
        while len(ids) > budget and self.drop_oldest_exchange():
            dropped += 1
            ids = self.encode()
        if len(ids) >= limit:
            advice = context_advice(len(ids), len(ids) + self.config.max_new_tokens, self.engine.context_limit,
                                    verb="restart talis chat with")
            raise TalisError(f"this message is {len(ids)} tokens with the system prompt, {len(ids) - limit + 1} "
                             f"more than the context of {limit} holds; {advice}")
        return ids, dropped

    def drop_oldest_exchange(self) -> bool:
        """Drop the oldest user message and the assistant's answer to it; False (nothing dropped) when only the
        newest message is left."""
        if len(self.messages) <= 1:
            return False
        del self.messages[0]
        if self.messages and self.messages[0]["role"] == "assistant":
            del self.messages[0]
        return True

    def reply(self, ids: list, on_text: Callable[[str], None]) -> Reply:
        """Generate the assistant's answer to `ids` (from fit_to_context), appending it to the conversation.

        Text goes to `on_text` as it streams. Ctrl-C (KeyboardInterrupt) stops it and keeps the partial reply.
        On an error the conversation is left as it was.
        """
        generator = self.engine.generator
        text, finish = "", "interrupted"
        waited = self.warm_up.wait() if self.warm_up is not None else 0.0  # the model is its thread's till then
        started = time.perf_counter()
        try:
            for event in generator.stream(ids, with_stops(self.config, self.template.stop)):
                text += event.text
                on_text(event.text)
                finish = event.finish_reason or finish
        except KeyboardInterrupt:
            finish = "interrupted"
        stats = generator.last_stats
        if stats is not None and stats.first_token_s == 0.0:  # interrupted before the first token
            stats.prefill_s = stats.first_token_s = time.perf_counter() - started
        if stats is not None:
            stats.first_token_s += waited  # the reply waited for the warm-up: its first token did too
        self.messages.append({"role": "assistant", "content": text})
        self.last_stats = stats
        return Reply(text, finish, stats)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def clear(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.messages.clear()

    def undo(self) -> int:
        """Remove the last exchange (the last user message and the reply to it); how many messages went."""
        count = 0
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            count += 1
        if self.messages:
            self.messages.pop()
            count += 1
        return count

    def drop_last_reply(self) -> None:
        """Take the last reply back so it can be generated again; UsageError when there is none."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise UsageError("there is no reply to regenerate yet; send a message first")
        self.messages.pop()

    # ----- transcripts

    def to_transcript(self) -> dict:
        return {"talis_transcript": TRANSCRIPT_VERSION, "system": self.system, "messages": self.messages,
                "template": self.template_spec, "preset": self.preset,
                "generation": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}}

    def save(self, path: Path) -> None:
        """Write the transcript as JSON atomically: a temporary file beside `path`, then a rename over it."""
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise UsageError(f"cannot save to {path}: folder {path.parent} does not exist")
        try:
            descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise UsageError(f"cannot save to {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(self.to_transcript(), file, ensure_ascii=False, indent=2)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise UsageError(f"cannot save to {path}: {exc.strerror or exc}") from None
            raise

    def load(self, path: Path) -> None:
        """Replace the conversation (system prompt and messages) with a transcript written by `save`."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no transcript at {path}; check the path") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"{path} is not a talis transcript ({exc.__class__.__name__}); pick a file /save wrote") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages):
            raise UsageError(f"{path} is not a talis transcript (no list of user/assistant messages)")
        system = data.get("system")
        self.system = system if isinstance(system, str) and system else None
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
