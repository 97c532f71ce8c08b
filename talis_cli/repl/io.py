"""The terminal side of `talis chat`: one object owns the prompt (history, keys, completion, toolbar) and the console."""

import os
from pathlib import Path
from typing import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.table import Table
from rich.text import Text

BLOCK_QUOTE = '"""'


def history_file() -> Path:
    """The chat history file in the user's data folder (platformdirs' choice when it is installed)."""
    try:
        from platformdirs import user_data_dir

        folder = Path(user_data_dir("talis", appauthor=False))
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        folder = Path(base) / "talis"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "chat_history"


class SlashCompleter(Completer):
    """Completes slash command names, then their arguments where a command lists choices."""

    def __init__(self, commands):
        self.commands = commands

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        command, space, prefix = text.partition(" ")
        choices = self.commands.argument_choices(command) if space else self.commands.names()
        current = prefix if space else command
        for choice in choices:
            if choice.startswith(current) and " " not in prefix:
                yield Completion(choice, start_position=-len(current))


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # Alt-Enter / Esc-Enter: a newline inside the message
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event):
        """Ctrl-C drops the line being typed (into the history, so Up brings it back); on an empty line it asks."""
        buffer = event.current_buffer
        if buffer.text:
            buffer.append_to_history()
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return bindings


class ChatIO:
    def __init__(self, console: Console, history_path: Path, toolbar: Callable[[], str], completer: Completer,
                 input=None, output=None):
        self.console = console
        self.prompt_session = PromptSession(history=FileHistory(str(history_path)), completer=completer,
                                            bottom_toolbar=toolbar, key_bindings=_key_bindings(),
                                            complete_while_typing=True, input=input, output=output)

    def read_message(self) -> str:
        """One message: a line, or a block between lines that start and end with \"\"\" (KeyboardInterrupt, EOFError)."""
        line = self.prompt_session.prompt(">>> ")
        if not line.lstrip().startswith(BLOCK_QUOTE):
            return line
        lines = [line.lstrip()[len(BLOCK_QUOTE):]]
        while not lines[-1].rstrip().endswith(BLOCK_QUOTE):
            lines.append(self.prompt_session.prompt("... "))
        lines[-1] = lines[-1].rstrip()[:-len(BLOCK_QUOTE)]
        message = "\n".join(lines).strip("\n")
        self.prompt_session.history.append_string(message)  # the whole block comes back with Up
        return message

    def info(self, text: str) -> None:
        self.console.print(Text(text, style="green"))

    def warning(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def error(self, text: str) -> None:
        self.console.print(Text.assemble(("error: ", "bold red"), text))

    def table(self, rows: list) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for row in rows:
            grid.add_row(*row)
        self.console.print(grid)
