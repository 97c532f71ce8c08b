"""`talis chat`: the real prompt-toolkit application fed keys through a pipe input, and the whole command on a
pseudo-terminal for what needs real signals (Ctrl-C during a reply).

Replies are compared with the engine's own greedy generation for the same rendered conversation.
"""

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from talis_cli.errors import TalisError, UsageError
from tests.tiny_models import hf_model, save_gptq

REPO = Path(__file__).resolve().parents[1]
ALT_ENTER, CTRL_C, CTRL_D = "\x1b\r", "\x03", "\x04"
REPLY_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repl_model")
    save_gptq(hf_model(seed=5, max_position_embeddings=256), folder, bits=4, group_size=64)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    from talis_cli.engine import Engine, LoadSettings

    return Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=256))


def new_session(engine, **kwargs):
    from talis_cli.generation import GenerationConfig
    from talis_cli.repl.session import ChatSession

    config = GenerationConfig(max_new_tokens=REPLY_TOKENS, temperature=0.0)
    return ChatSession(engine, config, kwargs.pop("template", "raw"), **kwargs)


def drive(session, keys: str, history: Path, first_message=None) -> str:
    """Run the REPL on `keys` (ending the session with Ctrl-D unless the keys leave first); what it printed."""
    from talis_cli.repl.app import ChatRepl

    printed = io.StringIO()
    console = Console(file=printed, width=200, color_system=None, highlight=False)
    with create_pipe_input() as keyboard:
        keyboard.send_text(keys + CTRL_D)
        ChatRepl(session, console=console, history_path=history, input=keyboard, output=DummyOutput()).run(first_message)
    return printed.getvalue()


def expected_reply(session, messages) -> str:
    """The engine's greedy reply to `messages` rendered with the session's template and system prompt."""
    from talis_cli.repl.session import render_chat, with_stops

    ids = render_chat(session.engine, session.template, session.system, messages)
    config = with_stops(session.config, session.template.stop)
    return "".join(event.text for event in session.engine.generator.stream(ids, config))


def test_multi_line_messages_and_replies(engine, tmp_path):
    session = new_session(engine, system="Be brief.")
    printed = drive(session, '"""first line\rsecond line"""\r' + "alpha" + ALT_ENTER + "beta\r", tmp_path / "h")
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["first line\nsecond line", "alpha\nbeta"]
    first = [{"role": "user", "content": users[0]}]
    assert session.messages[1]["content"] == expected_reply(session, first)
    assert session.messages[3]["content"] == expected_reply(session, session.messages[:3])
    assert printed.count("first token") == 2  # one stats line per reply
    history = (tmp_path / "h").read_text()
    assert "+first line\n+second line\n" in history and "+alpha\n+beta\n" in history


def test_a_first_message_from_the_command_line_is_answered_first(engine, tmp_path):
    session = new_session(engine)
    drive(session, "and the second\r", tmp_path / "h", first_message="the first")
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["the first", "and the second"]
    assert session.messages[1]["content"] == expected_reply(session, session.messages[:1])


def test_set_preset_system_template(engine, tmp_path):
    from talis_cli.presets import load_generation_preset

    session = new_session(engine)
    printed = drive(session, "/set temperature 0.5\r/set top_p 2\r/set top_k many\r/set warmth 1\r"
                             "/template chatml\r/template no-such\r/system Talk like a scribe.\r", tmp_path / "h")
    assert session.config.temperature == 0.5 and session.config.top_p != 2
    assert "top_p = 2.0 is out of range: allowed 0 < top_p <= 1" in printed
    assert "top_k must be an integer, got 'many'" in printed
    assert "unknown setting 'warmth'" in printed
    assert session.template.name == "chatml" and "unknown chat template 'no-such'" in printed
    assert session.system == "Talk like a scribe."
    drive(session, "/preset greedy\r", tmp_path / "h")
    assert session.config == load_generation_preset("greedy") and session.preset == "greedy"


def test_clear_undo_regen(engine, tmp_path):
    session = new_session(engine, system="Be brief.")
    drive(session, "one\rtwo\r/undo\r", tmp_path / "h")
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["one"]
    first_reply = session.messages[1]["content"]
    printed = drive(session, "/set temperature 1\r/set seed 7\r/regen\r", tmp_path / "h")
    assert len(session.messages) == 2 and printed.count("first token") == 1
    assert session.messages[1]["content"] == expected_reply(session, session.messages[:1])
    assert session.messages[1]["content"] != first_reply or REPLY_TOKENS < 2
    drive(session, "/clear\r", tmp_path / "h")
    assert session.messages == [] and session.system == "Be brief."
    assert "no reply to regenerate" in drive(session, "/regen\r", tmp_path / "h")


def test_save_then_load_gives_the_same_conversation(engine, tmp_path):
    session = new_session(engine, system="Keep to the point.")
    transcript = tmp_path / "chat.json"
    drive(session, f"In the beginning\rthen what?\r/save {transcript}\r", tmp_path / "h")
    saved_messages, saved_system = [dict(m) for m in session.messages], session.system
    assert [p.name for p in tmp_path.iterdir() if p.name != "h"] == ["chat.json"]  # no temporary file left
    assert json.loads(transcript.read_text())["messages"] == saved_messages

    other = new_session(engine)
    printed = drive(other, f"/load {transcript}\r", tmp_path / "h")
    assert other.messages == saved_messages and other.system == saved_system
    assert "loaded 4 message(s)" in printed
    assert "not a talis transcript" in drive(other, f"/load {tmp_path / 'h'}\r", tmp_path / "h")
    assert other.messages == saved_messages  # a failed /load changes nothing


def test_help_stats_info_and_leaving(engine, tmp_path):
    from talis_cli.repl.commands import Commands

    session = new_session(engine)
    printed = drive(session, "/help\rhello\r/stats\r/info\r", tmp_path / "h")
    for name in Commands(session, None).names():
        assert f"\n{name} " in printed
    stats = session.last_stats
    assert stats.new_tokens == REPLY_TOKENS
    assert f"prompt tokens     {stats.prompt_tokens}" in printed
    assert f"parameters: {engine.info['parameters']}" in printed
    for leave in ("/bye", "/exit", CTRL_D):
        session = new_session(engine)
        drive(session, f"{leave}\rnever sent\r", tmp_path / "h")
        assert session.messages == []


def test_ctrl_c_at_the_prompt(engine, tmp_path):
    session = new_session(engine)
    printed = drive(session, CTRL_C + "half-typed thought" + CTRL_C, tmp_path / "h")
    assert "(to leave, press Ctrl-D or type /bye)" in printed
    assert printed.count("to leave") == 1  # Ctrl-C on typed text only clears the line...
    assert "+half-typed thought" in (tmp_path / "h").read_text()  # ...which Up brings back
    assert session.messages == []


def test_context_overflow_drops_oldest_turns_but_keeps_the_system_prompt(model_dir, tmp_path):
    from talis_cli.engine import Engine, LoadSettings

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=48))
    session = new_session(small, system="System rule.")
    messages = [f"message number {i}" for i in range(6)]
    printed = drive(session, "".join(m + "\r" for m in messages), tmp_path / "h")
    assert "dropped the" in printed and "the system prompt stays" in printed
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == messages[-len(users):] and len(users) < len(messages)
    ids, dropped = session.fit_to_context()
    assert session.engine.tokenizer.decode(ids).count("System rule.") == 1


def test_a_message_longer_than_the_context_is_kept_in_history(model_dir, tmp_path):
    from talis_cli.engine import Engine, LoadSettings

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=24))
    session = new_session(small)
    long_message = "and it was so " * 20
    printed = drive(session, long_message + "\r", tmp_path / "h")
    assert "more than the context of 24 holds" in printed and "press Up to edit it" in printed
    assert session.messages == []
    assert long_message in (tmp_path / "h").read_text()


def test_a_failed_save_or_regen_leaves_the_conversation_as_it_was(model_dir, engine, tmp_path):
    session = new_session(engine)
    printed = drive(session, f"one\r/save {tmp_path}\r", tmp_path / "h")  # a folder, not a file
    assert f"cannot save to {tmp_path}" in printed
    kept = [dict(m) for m in session.messages]
    assert len(kept) == 2
    from talis_cli.engine import Engine, LoadSettings

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=24))
    tight = new_session(small)
    tight.messages = [{"role": "user", "content": "and it was so " * 20}, {"role": "assistant", "content": "ok"}]
    printed = drive(tight, "/regen\r", tmp_path / "h")  # the prompt no longer fits: no new reply
    assert "conversation is as it was" in printed
    assert tight.messages[-1] == {"role": "assistant", "content": "ok"} and len(tight.messages) == 2


def test_toolbar_and_completion(engine, tmp_path):
    from talis_cli.repl.app import ChatRepl
    from talis_cli.repl.io import SlashCompleter

    session = new_session(engine)
    drive(session, "hello\r", tmp_path / "h")
    with create_pipe_input() as keyboard:
        repl = ChatRepl(session, history_path=tmp_path / "h", input=keyboard, output=DummyOutput())
    toolbar = repl.toolbar()
    assert engine.model_dir.name in toolbar and f"context {session.context_used}/256" in toolbar
    from talis_cli.repl.session import render_chat

    # issue 15: "context used" is the conversation as it stands, rendered (no longer prompt + reply tokens)
    assert session.context_used == len(render_chat(engine, session.template, session.system, session.messages))

    def complete(text):
        return [c.text for c in SlashCompleter(repl.commands).get_completions(Document(text), None)]

    assert complete("/he") == ["/help"]
    assert set(complete("/re")) == {"/regen"}
    assert "temperature" in complete("/set temp")
    assert set(complete("/template ch")) == {"chatml"}
    assert complete("hello") == []


def test_regen_stats_count_computed_and_cached_prompt_tokens(engine, tmp_path):
    from talis_cli.repl.render import timings_of

    session = new_session(engine, system="Be brief.")
    drive(session, "In the beginning\r", tmp_path / "h")
    first = session.last_stats
    printed = drive(session, "/regen\r/stats\r", tmp_path / "h")
    stats = session.last_stats
    assert stats.prompt_tokens == first.prompt_tokens and stats.reused_tokens == stats.prompt_tokens - 1
    rate = timings_of(stats)["prefill_tok_s"]
    assert rate == round(1 / stats.prefill_s, 2)  # over the one computed token
    assert f"prompt 1 tok (+{stats.prompt_tokens - 1} cached), {rate:.1f} tok/s | reply {REPLY_TOKENS} tok" in printed
    assert re.search(rf"^cached tokens +{stats.reused_tokens} *$", printed, re.M)
    assert re.search(rf"^first token +{timings_of(stats)['first_token_s']:.3f} s *$", printed, re.M)


def test_context_used_follows_every_change_of_the_conversation(engine, tmp_path):
    from talis_cli.repl.app import ChatRepl
    from talis_cli.repl.session import render_chat

    session = new_session(engine, system="Be brief.")
    with create_pipe_input() as keyboard:
        repl = ChatRepl(session, history_path=tmp_path / "h", input=keyboard, output=DummyOutput())

    def shown() -> int:
        count = int(repl.toolbar().split("context ")[1].split("/")[0])
        assert count == session.context_used
        return count

    def rendered(messages) -> int:
        return len(render_chat(engine, session.template, session.system, messages))

    assert shown() == rendered([])  # the system prompt alone
    drive(session, "one\rtwo\r", tmp_path / "h")
    assert shown() == rendered(session.messages) and len(session.messages) == 4
    two_exchanges = shown()
    drive(session, "/undo\r", tmp_path / "h")
    assert shown() == rendered(session.messages) < two_exchanges and len(session.messages) == 2
    before_save = shown()
    drive(session, f"/save {tmp_path / 'chat.json'}\r", tmp_path / "h")
    other = new_session(engine)
    drive(other, f"/load {tmp_path / 'chat.json'}\r", tmp_path / "h")
    assert other.context_used == before_save
    drive(session, "/system A much longer system prompt than before, to be sure.\r", tmp_path / "h")
    assert shown() == rendered(session.messages) > before_save
    drive(session, "/clear\r", tmp_path / "h")
    assert shown() == rendered([])


def test_settings_are_shown_as_users_write_them(engine, tmp_path):
    session = new_session(engine)
    printed = drive(session, "/set\r/set stop LORD\r/set seed 5\r/set seed random\r/set stop none\r"
                             "/system Be brief.\r/system\r", tmp_path / "h")
    lines = printed.splitlines()
    assert re.search(r"^seed +random *$", printed, re.M) and re.search(r"^stop +none *$", printed, re.M)
    assert re.search(r"^temperature +0 *$", printed, re.M) and re.search(r"^max_new_tokens +6 *$", printed, re.M)
    assert ['stop = "LORD"', "seed = 5", "seed = random", "stop = none"] == [
        line for line in lines if line.startswith(("stop =", "seed ="))]
    assert 'system prompt: "Be brief."' in lines
    for python_value in ("None", "()", "('", "'Be brief.'"):
        assert python_value not in printed
    assert session.config.stop == () and session.config.seed is None
    printed = drive(session, "hello\r/stats\r", tmp_path / "h")
    assert re.search(r"^first token +\d+\.\d{3} s *$", printed, re.M) and "first token s" not in printed
    assert re.search(r"^prefill rate +\d+\.\d tok/s \(computed tokens\) *$", printed, re.M)


def test_a_reply_that_fills_the_context_says_so(slow_model_dir, tmp_path):
    from talis_cli.engine import Engine, LoadSettings

    small = Engine.load(LoadSettings(model_dir=slow_model_dir, max_seq_len=48))
    session = new_session(small)
    session.config = session.config.with_overrides(max_new_tokens=100)
    printed = drive(session, "In the beginning\r", tmp_path / "h")
    assert ("(the reply stopped: the context of 48 tokens is full; /undo or /clear makes room, or the oldest "
            "exchanges are dropped with the next message; --max-seq-len can allocate up to 4096)") in printed
    assert session.context_used >= 48 - 1


def test_a_message_too_long_gets_advice_that_works(model_dir, tmp_path):
    from talis_cli.engine import Engine, LoadSettings

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=24))
    session = new_session(small)
    session.add_user("and it was so " * 20)
    with pytest.raises(TalisError) as raised:
        session.fit_to_context()
    n = len(session.encode())
    assert str(raised.value) == (f"this message is {n} tokens with the system prompt, {n - 23} more than the context "
                                 f"of 24 holds; restart talis chat with --max-seq-len {n + REPLY_TOKENS} (the model "
                                 "allows up to 256) or shorten it")
    session.messages[-1]["content"] = "and it was so " * 100  # longer than the model's whole context
    with pytest.raises(TalisError, match="; shorten it: the model's whole context is 256 tokens$"):
        session.fit_to_context()
    with pytest.raises(UsageError) as raised:  # a transcript that is not there: a usage error (exit code 2)
        session.load(tmp_path / "absent.json")
    assert raised.value.exit_code == 2 and str(raised.value) == f"no transcript at {tmp_path / 'absent.json'}; check the path"


# ---------------------------------------------------------------- the whole command on a pseudo-terminal


class Terminal:
    """A child process on a pseudo-terminal, read continuously so it never blocks on output."""

    def __init__(self, args, env):
        self.leader, follower = pty.openpty()
        self.process = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, cwd=REPO, env=env,
                                        preexec_fn=self._take_terminal)
        os.close(follower)
        self.output = b""
        self.seen = 0  # output before this offset has been matched already

    def expect(self, needle: bytes, timeout: float = 60) -> None:
        """Wait until `needle` appears in what the child wrote since the previous expect."""
        deadline = time.monotonic() + timeout
        while needle not in self.output[self.seen:]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {needle!r}; got {self.output[-2000:]!r}"
            ready, _, _ = select.select([self.leader], [], [], remaining)
            if ready:
                try:
                    self.output += os.read(self.leader, 65536)
                except OSError:
                    assert False, f"the process ended while waiting for {needle!r}: {self.output[-2000:]!r}"
        self.seen = self.output.index(needle, self.seen) + len(needle)

    @staticmethod
    def _take_terminal() -> None:
        """In the child: a session of its own with the pseudo-terminal as controlling terminal (so ^C is SIGINT),
        and SIGINT's default action even where the tests run with it ignored (a shell's background job)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def send(self, text: str) -> None:
        os.write(self.leader, text.encode())

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.leader)
        return code


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    """A model whose greedy replies never end early (end-of-sequence can't win) and may run 4000 tokens."""
    import torch

    folder = tmp_path_factory.mktemp("repl_long_model")
    model = hf_model(seed=6, max_position_embeddings=4096)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    save_gptq(model, folder, bits=4, group_size=64)
    return folder


def test_ctrl_c_during_a_reply_keeps_it_then_the_chat_goes_on(slow_model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_DATA_HOME=str(tmp_path / "data"), TERM="xterm-256color",
               HF_HUB_OFFLINE="1", COLUMNS="120", LINES="40", PROMPT_TOOLKIT_NO_CPR="1")
    env.pop("NO_COLOR", None)
    terminal = Terminal([sys.executable, "-m", "talis_cli", "chat", "-m", str(slow_model_dir), "--template", "raw",
                         "--temperature", "0", "-n", "4000", "--max-seq-len", "4096"], env)
    try:
        terminal.expect(b">>>")
        terminal.send("Tell me everything\r")
        for _ in range(3):
            terminal.expect(b"\x1b[36m")  # reply text (cyan) is streaming
        terminal.send(CTRL_C)
        terminal.expect(b"(stopped; the partial reply is kept)")
        terminal.expect(b">>>")
        # each input waits for the prompt: before it, the terminal is in line mode and would eat a Ctrl-D
        terminal.send("/set max_new_tokens 3\r")
        terminal.expect(b"max_new_tokens = 3")
        terminal.expect(b">>>")
        terminal.send("And then?\r")
        terminal.expect(b"first token")
        terminal.expect(b">>>")
        transcript = tmp_path / "chat.json"
        terminal.send(f"/save {transcript}\r")
        terminal.expect(b"saved 4 message(s)")
        terminal.expect(b">>>")
        terminal.send(CTRL_D)
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
    messages = json.loads(transcript.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"]  # the partial reply was kept
    history = (tmp_path / "data" / "talis" / "chat_history").read_text()
    assert "+Tell me everything" in history and "+And then?" in history
