"""Slash commands of `talis chat`: every `cmd_<name>` method is `/<name>`; its docstring's first line is its help.

A docstring's first line reads "ARGUMENTS -- what it does"; `argument_choices_<name>` methods feed completion.
"""

import dataclasses
import enum
import inspect
import json

from talis_cli.chat_templates import TEMPLATE_CHOICES
from talis_cli.errors import UsageError


class Outcome(enum.Enum):
    CONTINUE = "continue"  # back to the prompt
    REPLY = "reply"  # generate a reply to the conversation as it now stands
    EXIT = "exit"


class Commands:
    def __init__(self, session, out):
        self.session = session  # ChatSession
        self.out = out  # has info(text), warning(text), table(rows)

    # ----- dispatch and completion

    def names(self) -> list:
        return sorted(f"/{name[4:]}" for name, _ in inspect.getmembers(self, inspect.ismethod) if name.startswith("cmd_"))

    def run(self, line: str) -> Outcome:
        """Run one slash command line; UsageError for an unknown command or a bad argument."""
        name, _, argument = line.strip()[1:].partition(" ")
        method = getattr(self, f"cmd_{name}", None)
        if method is None:
            raise UsageError(f"unknown command /{name}; /help lists the commands")
        return method(argument.strip()) or Outcome.CONTINUE

    def argument_choices(self, command: str) -> list:
        method = getattr(self, f"argument_choices_{command.lstrip('/')}", None)
        return method() if method else []

    def argument_choices_set(self) -> list:
        from talis_cli.generation import FIELD_NAMES

        return list(FIELD_NAMES)

    def argument_choices_preset(self) -> list:
        from talis_cli.presets import list_generation_presets

        return list_generation_presets()

    def argument_choices_template(self) -> list:
        return list(TEMPLATE_CHOICES)

    # ----- commands

    def cmd_help(self, argument: str):
        """-- list the commands"""
        rows = []
        for name in self.names():
            usage, _, summary = inspect.getdoc(getattr(self, f"cmd_{name[1:]}")).splitlines()[0].partition("--")
            rows.append((f"{name} {usage.strip()}".strip(), summary.strip()))
        rows.append(('"""', 'start or end a multi-line message (Alt-Enter also adds a line)'))
        self.out.table(rows)

    def cmd_set(self, argument: str):
        """<param> <value> -- change a generation setting (no argument: show them all)"""
        from talis_cli.generation import FIELD_NAMES
        from talis_cli.settings import convert_setting

        if not argument:
            self._show_config()
            return
        name, _, value = argument.partition(" ")
        name = name.replace("-", "_")
        if name not in FIELD_NAMES:
            raise UsageError(f"/set: unknown setting '{name}'; choose one of {', '.join(FIELD_NAMES)}")
        if not value.strip():
            raise UsageError(f"/set {name} needs a value, e.g. /set {name} {self._shown(name)}")
        if name == "seed" and value.strip().lower() in ("none", "null", "random"):
            converted = None
        elif name == "stop" and value.strip().lower() == "none":
            converted = ()
        else:
            converted = convert_setting(name, value.strip(), "/set")
        self.session.config = dataclasses.replace(self.session.config, **{name: converted}).validate()
        self.out.info(f"{name} = {self._shown(name)}")

    def cmd_preset(self, argument: str):
        """<name|file> -- replace every generation setting by a preset's (no argument: list presets)"""
        from talis_cli.presets import MODEL_PRESET, list_generation_presets, load_generation_preset

        if not argument:
            self.out.info(f"presets: {', '.join(list_generation_presets())} (now: {self.session.preset or 'none'})")
            return
        if argument == MODEL_PRESET:
            self._need_local_model(f"preset {MODEL_PRESET}")  # it reads the model folder's generation_config.json
        self.session.config = load_generation_preset(argument, self.session.model_dir)
        self.session.preset = argument
        self._show_config()

    def cmd_system(self, argument: str):
        """<text> -- set the system prompt (no argument: show it)"""
        if argument:
            self.session.system = argument
            self.out.info("system prompt set")
        else:
            self.out.info(f"system prompt: {json.dumps(self.session.system, ensure_ascii=False)}"
                          if self.session.system else "no system prompt")

    def cmd_template(self, argument: str):
        """<name|file> -- change the chat template (no argument: show it)"""
        if argument:
            self._need_local_model("template")
            self.session.set_template(argument)
        self.out.info(f"template: {self.session.template.name} (choices: {', '.join(TEMPLATE_CHOICES)} or a Jinja file)")

    def cmd_clear(self, argument: str):
        """-- forget the conversation (the system prompt stays)"""
        self.session.clear()
        self.out.info("conversation cleared")

    def cmd_undo(self, argument: str):
        """-- remove the last message and its reply"""
        removed = self.session.undo()
        self.out.info(f"removed {removed} message(s)" if removed else "nothing to undo")

    def cmd_regen(self, argument: str):
        """-- generate the last reply again"""
        self.session.drop_last_reply()
        return Outcome.REPLY

    def cmd_save(self, argument: str):
        """<file> -- save the conversation as JSON"""
        if not argument:
            raise UsageError("/save needs a file name, e.g. /save chat.json")
        self.session.save(argument)
        self.out.info(f"saved {len(self.session.messages)} message(s) to {argument}")

    def cmd_load(self, argument: str):
        """<file> -- replace the conversation by one /save wrote"""
        if not argument:
            raise UsageError("/load needs a file name, e.g. /load chat.json")
        self.session.load(argument)
        self.out.info(f"loaded {len(self.session.messages)} message(s) from {argument}")

    def cmd_stats(self, argument: str):
        """-- timings of the last reply and memory in use"""
        from talis_cli.repl.render import memory_in_use, timings_of

        stats = self.session.last_stats
        if stats is None:
            self.out.info(f"no reply yet; {memory_in_use()}" if self.session.local else "no reply yet")
            return
        t = timings_of(stats)
        rows = [("prompt tokens", str(stats.prompt_tokens)), ("cached tokens", str(stats.reused_tokens)),
                ("generated tokens", str(stats.new_tokens)), ("prefill", f"{t['prefill_s']:.3f} s"),
                ("prefill rate", f"{t['prefill_tok_s']:.1f} tok/s (computed tokens)"),
                ("decode", f"{t['decode_s']:.3f} s"), ("decode rate", f"{t['decode_tok_s']:.1f} tok/s"),
                ("first token", f"{t['first_token_s']:.3f} s")]
        size = f"/{self.session.context_size}" if self.session.context_size else ""
        rows.append(("context used", f"{self.session.context_used}{size}"))
        rows += [("memory", memory_in_use())] if self.session.local else []
        self.out.table(rows)

    def cmd_info(self, argument: str):
        """-- the model: architecture, quantization, size, devices"""
        from talis_cli.repl.render import print_tree

        self._need_local_model("info")
        print_tree(self.out.console, self.session.engine.info)

    def cmd_exit(self, argument: str):
        """-- leave (also /bye, Ctrl-D)"""
        return Outcome.EXIT

    def cmd_bye(self, argument: str):
        """-- leave (also /exit, Ctrl-D)"""
        return Outcome.EXIT

    def _need_local_model(self, command: str) -> None:
        if not self.session.local:
            raise UsageError(f"/{command} needs a local model; this chat's replies come from {self.session.model_name}, "
                             "whose model and chat template are the server's (`talis serve` sets them)")

    def _shown(self, name: str) -> str:
        """The value of setting `name` as the user types it (seed random, stop "a", "b" or none)."""
        from talis_cli.wording import format_setting

        return format_setting(name, getattr(self.session.config, name))

    def _show_config(self) -> None:
        from talis_cli.generation import FIELD_NAMES

        self.out.table([(name, self._shown(name)) for name in FIELD_NAMES])
