"""The chat loop: read a message or a slash command, stream the reply, show the stats line."""

from pathlib import Path
from typing import Optional

from rich.console import Console

from talis_cli.errors import TalisError
from talis_cli.repl.commands import Commands, Outcome
from talis_cli.repl.io import ChatIO, SlashCompleter, history_file
from talis_cli.repl.render import ReplyRenderer, oom_message
from talis_cli.wording import context_full_advice


class ChatRepl:
    def __init__(self, session, console: Optional[Console] = None, history_path: Optional[Path] = None,
                 input=None, output=None):
        self.session = session  # ChatSession
        self.console = console or Console(highlight=False)
        self.io = ChatIO(self.console, history_path or history_file(), self.toolbar, None, input, output)
        self.commands = Commands(session, self.io)
        self.io.prompt_session.completer = SlashCompleter(self.commands)
        self.renderer = ReplyRenderer(self.console, show_memory=session.local)  # a server's memory is not ours

    def toolbar(self) -> str:
        session = self.session
        size = f"/{session.context_size}" if session.context_size else ""
        return (f" {session.model_name} | preset {session.preset or 'default'} | template {session.template.name} | "
                f"context {session.context_used}{size} | /help, Ctrl-D to leave ")

    def run(self, first_message: Optional[str] = None) -> None:
        self.io.info("talis chat: /help lists commands, \"\"\" starts a multi-line message, Ctrl-D or /bye leaves")
        if first_message and self.handle(first_message) is Outcome.EXIT:
            return
        while True:
            try:
                line = self.io.read_message()
            except KeyboardInterrupt:
                self.io.info("(to leave, press Ctrl-D or type /bye)")
                continue
            except EOFError:
                break
            if self.handle(line) is Outcome.EXIT:
                break

    def handle(self, line: str) -> Outcome:
        """Act on one input: a slash command or a message to reply to."""
        if not line.strip():
            return Outcome.CONTINUE
        if line.startswith("/"):
            before = list(self.session.messages)
            try:
                outcome = self.commands.run(line)
            except TalisError as exc:
                self.io.error(str(exc))
                return Outcome.CONTINUE
            if outcome is Outcome.REPLY and not self.respond():
                self.session.messages[:] = before  # e.g. a failed /regen keeps the reply it was replacing
                self.io.info("(no new reply; the conversation is as it was)")
            return outcome
        self.session.add_user(line)
        if not self.respond():
            self.session.messages.pop()
            self.io.info("(the message was not sent; press Up to edit it)")
        return Outcome.CONTINUE

    def respond(self) -> bool:
        """Stream a reply to the conversation; False when none came (an error, or Ctrl-C before generation
        started), and the caller then puts the conversation back (the input history still holds the message)."""
        try:
            self._stream_reply()
        except TalisError as exc:
            self.io.error(str(exc))
        except KeyboardInterrupt:
            self.io.warning("(interrupted)")
        except Exception as exc:
            message = oom_message(exc)
            if message is None:
                raise
            self.io.error(message)
        return bool(self.session.messages) and self.session.messages[-1]["role"] != "user"

    def _stream_reply(self) -> None:
        ids, dropped = self.session.fit_to_context()
        if dropped:
            self.io.warning(f"(the conversation outgrew the context: dropped the {dropped} oldest exchange(s); "
                            "the system prompt stays)")
        self.renderer.start()
        reply = self.session.reply(ids, self.renderer.feed)
        full = ""
        if reply.finish_reason == "context" and not self.session.local:
            full = ("(the reply stopped: the server's context is full; /undo or /clear makes room, or the oldest "
                    "exchanges are dropped with the next message; `talis serve --max-seq-len N` sets the context)")
        elif reply.finish_reason == "context":
            size, limit = self.session.context_size, self.session.engine.context_limit
            full = (f"(the reply stopped: the context of {size} tokens is full; /undo or /clear makes room, "
                    f"or the oldest exchanges are dropped with the next message; {context_full_advice(size, limit)})")
        self.renderer.end(reply.stats, interrupted=reply.finish_reason == "interrupted", context_full=full)
        if reply.dropped:  # a server's context: known only once it refused the longer conversation
            self.io.warning(f"(the conversation outgrew the server's context: dropped the {reply.dropped} oldest "
                            "exchange(s) before this reply; the system prompt stays)")


def run_chat(session, first_message: Optional[str] = None) -> None:
    ChatRepl(session).run(first_message)
