"""`talis chat --url`: a ChatSession whose replies stream from `talis serve` (POST /v1/chat/completions).

The conversation, /set, /preset, /undo, /clear, /regen, /save and /load work as in a local chat: the messages live
here and every request sends them all with the session's generation settings. The server renders them with its
chat template and checks them against its context, so what needs the model itself (/template, /info) says so.
"""

from __future__ import annotations

from typing import Callable, Optional

from talis_cli.repl.session import ChatSession, Reply
from talis_cli.remote.client import ServerClient, ServerError

CONTEXT_EXCEEDED = "context_length_exceeded"  # the server's error code for a prompt longer than its context


class _ServerTemplate:
    """Stands in for a chat template in what the REPL shows: the server's own renders the messages."""

    name = "the server's"
    stop = ()


class RemoteChatSession(ChatSession):
    """A chat with the model of the server `client` talks to (`model_id` as /v1/models names it)."""

    local = False

    def __init__(self, client: ServerClient, model_id: str, config, system: Optional[str] = None,
                 preset: Optional[str] = None):
        self.engine = None
        self.client = client
        self.model_id = model_id
        self.config = config  # GenerationConfig: sent in full with every request
        self.preset = preset
        self.template_spec = None
        self.template = _ServerTemplate()
        self.system = system
        self.messages: list = []
        self.last_stats = None

    @classmethod
    def connect(cls, url: str, api_key: Optional[str], config, system: Optional[str] = None,
                preset: Optional[str] = None) -> "RemoteChatSession":
        """A session with the server at `url`, after checking that it answers and takes `api_key`
        (ServerError, one line, otherwise)."""
        client = ServerClient(url, api_key, connections=1)
        try:
            return cls(client, client.model_id(), config, system, preset)
        except BaseException:
            client.close()
            raise

    # ----- what the REPL shows

    @property
    def model_name(self) -> str:
        return f"{self.model_id} at {self.client.url}"

    @property
    def model_dir(self):
        return None  # `/preset model` needs the folder: load_generation_preset then says so

    @property
    def context_size(self):
        return None  # the server's; it refuses a conversation that outgrows it (400, with the counts)

    @property
    def context_used(self) -> int:
        """Tokens of the conversation as the server counted them at the last reply (prompt + reply)."""
        stats = self.last_stats
        return stats.prompt_tokens + stats.new_tokens if stats is not None and self.messages else 0

    def set_template(self, spec: str) -> None:
        from talis_cli.errors import UsageError

        raise UsageError("the chat template is the server's; start `talis serve --template ...` to change it")

    # ----- conversation

    def fit_to_context(self) -> tuple:
        """(None, 0): the server renders and measures the conversation; `reply` drops the oldest exchanges while
        the server answers that the conversation does not fit its context."""
        return None, 0

    def conversation(self) -> list:
        """The messages of the next request: the system prompt, then every turn."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + list(self.messages)

    def reply(self, ids, on_text: Callable[[str], None]) -> Reply:
        """Stream the server's reply to the conversation (`ids` unused: the server renders it), appending it.

        While the server answers that the conversation does not fit its context (400 context_length_exceeded,
        before any text), the oldest exchange is dropped and the request sent again, as local chat drops them
        (the system prompt and the newest message stay; Reply.dropped counts them); when the newest message alone
        does not fit, that error (ServerError) with the conversation as it was. Ctrl-C closes the connection (the
        server cancels the request) and keeps the partial reply; on another error the conversation is left as it
        was."""
        text, finish, dropped = "", "interrupted", []
        while True:
            reply = self.client.chat(self.conversation(), self.config)
            try:
                with reply:
                    for event in reply:
                        text += event.text
                        on_text(event.text)
                        finish = event.finish_reason or finish
                break
            except KeyboardInterrupt:
                finish = "interrupted"
                break
            except ServerError as error:
                if text or error.code != CONTEXT_EXCEEDED or len(self.messages) <= 1:
                    self.messages[:0] = [m for exchange in dropped for m in exchange]  # as it was
                    raise
                dropped.append(self._take_oldest_exchange())
        self.messages.append({"role": "assistant", "content": text})
        self.last_stats = reply.stats
        return Reply(text, finish, reply.stats, dropped=len(dropped))

    def _take_oldest_exchange(self) -> list:
        """Remove and return the oldest user message and the answer to it (drop_oldest_exchange)."""
        before = list(self.messages)
        self.drop_oldest_exchange()
        return before[:len(before) - len(self.messages)]

    def clear(self) -> None:
        super().clear()
        self.last_stats = None
