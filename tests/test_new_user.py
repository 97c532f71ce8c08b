"""What a new user's run over every command found (issue 15, kind 13): help, version, flags, exit codes, context
limits and their advice, quantize's output, threads, and running without triton.

Most cases call the CLI's entry point in-process (`main(argv)`), which prints and exits as the console script
does; what needs a fresh interpreter runs as a subprocess.
"""

import configparser
import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests.tiny_models import hf_model, save_fp16, save_gptq

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 256  # the tiny models' max_position_embeddings


def talis(capsys, *args) -> tuple:
    """(exit code, stdout, stderr) of `talis ARGS` run in this process."""
    from talis_cli.cli import main

    capsys.readouterr()
    stdin, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(b""))  # nothing piped in
    try:
        with pytest.raises(SystemExit) as ended:
            main([str(a) for a in args])
    finally:
        sys.stdin = stdin
    out, err = capsys.readouterr()
    return ended.value.code, out, err


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 4-bit model whose greedy replies never end early: end-of-sequence (logit 0) never wins."""
    folder = tmp_path_factory.mktemp("new_user_model")
    model = hf_model(seed=8, max_position_embeddings=CONTEXT)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    save_gptq(model, folder, bits=4, group_size=64)
    return folder


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # help rows on one line each
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)


# ---------------------------------------------------------------- --version, --help, flags


def test_version_prints_the_package_version(capsys):
    for flag in ("--version", "-V"):
        assert talis(capsys, flag) == (0, f"talis {version('talis')}\n", "")


COMMANDS = ("", "generate", "chat", "info", "presets", "perplexity", "quantize", "bench")  # "": talis itself


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_metavars_and_defaults(capsys, command):
    from talis_cli.generation import FIELD_NAMES, GenerationConfig
    from talis_cli.wording import format_setting

    code, out, _ = talis(capsys, *([command] if command else []), "--help")
    assert code == 0
    for python_value in ("<bool>", "<list[", "<str>", "<int", "<float", "<path>", "{"):
        assert python_value not in out, (command, python_value)
    rows = {match.group(1): line for line in out.splitlines() if (match := re.search(r"│[ *]+(--[a-z-]+)", line))}
    assert "--help" in rows and "-h" in rows["--help"]
    if command == "quantize":
        assert "Usage: talis quantize [OPTIONS] MODEL_DIR OUT_DIR" in out
        assert re.search(r"--bits +BITS +Bits per weight: 2, 3, 4 or 8\. +\[default: 4\]", rows["--bits"])
    if command in ("generate", "chat"):
        defaults = GenerationConfig()
        for name in FIELD_NAMES:  # every sampling setting has a flag, with its default
            flag = "--" + name.replace("_", "-")
            assert f"[default: {format_setting(name, getattr(defaults, name))}]" in rows[flag], flag
        assert "[default: random]" in rows["--seed"] and "[default: none]" in rows["--stop"]
        assert re.search(r"--temperature +T +Sampling temperature; 0 is greedy\. +\[default: 0\.8\]", rows["--temperature"])
        assert re.search(r"--chat +Wrap the prompt", rows.get("--chat", "--chat  Wrap the prompt"))
        assert "--threads" in rows and "[default: the free cores" in rows["--threads"]


@pytest.mark.parametrize("flag, value, message", [
    ("--repetition-window", "-1", "repetition_window = -1 is out of range: allowed an integer >= 0 (0 = the whole context)"),
    ("--frequency-penalty", "2.5", "frequency_penalty = 2.5 is out of range: allowed -2 <= frequency_penalty <= 2"),
    ("--presence-penalty", "-3", "presence_penalty = -3.0 is out of range: allowed -2 <= presence_penalty <= 2"),
])
def test_penalty_flags_reach_the_settings(capsys, flag, value, message):
    code, out, err = talis(capsys, "generate", "-p", "hello", flag, value)
    assert (code, out, one_line(err)) == (2, "", message)


def test_penalty_flags_change_the_text_as_the_engine_does(capsys, model_dir):
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.generation import GenerationConfig

    flags = ["--repetition-window", "0", "--frequency-penalty", "1.5", "--presence-penalty", "1", "--temperature",
             "0", "-n", "12", "--json"]
    code, out, err = talis(capsys, "generate", "-m", model_dir, "-p", "And God said", *flags)
    assert code == 0, err
    engine = Engine.load(LoadSettings(model_dir=model_dir))
    ids = engine.encode("And God said")
    penalised = GenerationConfig(max_new_tokens=12, temperature=0.0, repetition_window=0, frequency_penalty=1.5,
                                 presence_penalty=1.0)
    expected = "".join(e.text for e in engine.generator.stream(ids, penalised))
    plain = "".join(e.text for e in engine.generator.stream(ids, GenerationConfig(max_new_tokens=12, temperature=0.0)))
    assert json.loads(out)["text"] == expected and expected != plain


# ---------------------------------------------------------------- missing files: exit 2, one line


def missing_file_cases(tmp: Path, model_dir: Path):
    text = tmp / "text.txt"
    absent = tmp / "absent"
    return {
        "model folder": (["generate", "-p", "hi", "-m", absent], f"model folder {absent} does not exist: check --model"),
        "info model folder": (["info", "-m", absent], f"model folder {absent} does not exist: check --model"),
        "perplexity model folder": (["perplexity", "-m", absent, "--file", text],
                                    f"model folder {absent} does not exist: check --model"),
        "chat model folder": (["chat", "-m", absent], f"model folder {absent} does not exist: check --model"),
        "checkpoint": (["generate", "-p", "hi", "-m", model_dir, "--checkpoint", absent / "w.safetensors"],
                       f"checkpoint file {absent / 'w.safetensors'} does not exist: check --checkpoint"),
        "config": (["generate", "-p", "hi", "--config", absent / "t.toml"],
                   f"config file {absent / 't.toml'} does not exist: check the --config path"),
        "preset file": (["generate", "-p", "hi", "--preset", absent / "p.json"], f"{absent / 'p.json'}: no such file"),
        "device map file": (["generate", "-p", "hi", "-m", model_dir, "--device-map", absent / "map.json"],
                            f"device map '{absent / 'map.json'}' is neither a built-in name"),
        "template file": (["generate", "-p", "hi", "--template", absent / "t.jinja"],
                          f"chat template file {absent / 't.jinja'} does not exist: check --template"),
        "perplexity file": (["perplexity", "-m", model_dir, "--file", absent / "t.txt"],
                            f"text file {absent / 't.txt'} does not exist: check --file"),
        "perplexity file is a folder": (["perplexity", "-m", model_dir, "--file", tmp], f"cannot read {tmp}"),
        "quantize model folder": (["quantize", absent, tmp / "out", "--method", "rtn"],
                                  f"model folder {absent} does not exist: check MODEL_DIR"),
        "quantize calibration file": (["quantize", model_dir, tmp / "out", "--calib", absent / "c.txt"],
                                      f"calibration file {absent / 'c.txt'} does not exist: check --calib"),
        "transcript (chat's /load)": (None, f"no transcript at {absent / 'chat.json'}; check the path"),
    }


def load_transcript(path: Path) -> tuple:
    """(exit code, "error: ..." line) of a chat session's /load of `path` (the REPL prints UsageErrors so)."""
    from types import SimpleNamespace

    from talis_cli.errors import UsageError
    from talis_cli.repl.session import ChatSession

    session = ChatSession(SimpleNamespace(tokenizer=None), config=None, template_spec="raw")
    with pytest.raises(UsageError) as raised:
        session.load(path)
    return raised.value.exit_code, f"error: {raised.value}\n"


CASES = list(missing_file_cases(Path("/x"), Path("/y")))


@pytest.mark.parametrize("case", CASES)
def test_a_missing_file_exits_2_with_one_line(capsys, tmp_path, model_dir, case):
    (tmp_path / "text.txt").write_text("In the beginning God created the heaven and the earth.\n" * 20)
    args, message = missing_file_cases(tmp_path, model_dir)[case]
    if args is None:
        (code, err), out = load_transcript(tmp_path / "absent" / "chat.json"), ""
    else:
        code, out, err = talis(capsys, *args)
    assert code == 2 and out == ""
    assert one_line(err).startswith(message), err


# ---------------------------------------------------------------- context limits and their advice


def test_perplexity_window_beyond_the_context_is_a_usage_error(capsys, model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((REPO / "tests" / "data" / "kjv" / "heldout.txt").read_text(encoding="utf-8")[:4000])
    code, _, err = talis(capsys, "perplexity", "-m", model_dir, "--file", text, "--ctx", 4096)
    assert code == 2
    assert one_line(err) == f"--ctx 4096 is longer than the model's context of {CONTEXT} tokens; use --ctx {CONTEXT} or less"
    code, _, err = talis(capsys, "perplexity", "-m", model_dir, "--file", text, "--ctx", 128, "--max-seq-len", 64)
    assert code == 2
    assert one_line(err) == ("--ctx 128 is longer than the context allocated by --max-seq-len 64; raise --max-seq-len "
                             f"to 128 (the model allows up to {CONTEXT}) or use a smaller --ctx")
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.errors import UsageError
    from talis_cli.perplexity import perplexity

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=32))
    with pytest.raises(UsageError, match="--ctx 64 is longer than the context of 32 tokens; use --ctx 32 or less"):
        perplexity(small, text.read_text(), ctx=64)


def test_a_prompt_too_long_gets_advice_that_works(model_dir):
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.errors import TalisError
    from talis_cli.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=20, temperature=0.0)
    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=16))
    with pytest.raises(TalisError) as raised:
        small.generator.stream(list(range(5, 45)), config)
    assert str(raised.value) == ("the prompt is 40 tokens, 25 too many for a context of 16 (room for 15 plus one new "
                                 f"token); pass --max-seq-len 60 (the model allows up to {CONTEXT}) or shorten it")
    with pytest.raises(TalisError) as raised:  # never more than the model allows
        small.generator.stream(list(range(5, 255)), config)  # 250 + 20 new tokens > 256
    assert str(raised.value).endswith(f"; pass --max-seq-len {CONTEXT} (the model allows up to {CONTEXT}) or shorten it")
    full = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=CONTEXT))
    for engine in (small, full):  # a prompt as long as the model's context: more context cannot help
        with pytest.raises(TalisError) as raised:
            engine.generator.stream(list(range(5, 5 + CONTEXT)), config)
        assert str(raised.value).endswith(f"; shorten it: the model's whole context is {CONTEXT} tokens")


def test_a_reply_cut_by_the_full_context_says_so(capsys, model_dir):
    from talis_cli.engine import Engine, LoadSettings
    from talis_cli.generation import GenerationConfig

    small = Engine.load(LoadSettings(model_dir=model_dir, max_seq_len=16))
    ids = small.encode("In the beginning")
    events = list(small.generator.stream(ids, GenerationConfig(max_new_tokens=40, temperature=0.0)))
    assert len(events) == 16 - len(ids) and events[-1].finish_reason == "context"
    events = list(small.generator.stream(ids, GenerationConfig(max_new_tokens=3, temperature=0.0)))
    assert len(events) == 3 and events[-1].finish_reason == "length"

    args = ["generate", "-m", model_dir, "-p", "In the beginning", "--max-seq-len", 16, "-n", 40, "--temperature", 0]
    code, out, err = talis(capsys, *args)
    assert code == 0 and out == "".join(e.text for e in small.generator.stream(ids, GenerationConfig(max_new_tokens=40, temperature=0.0))) + "\n"
    assert err == ("note: the reply stopped at the end of the context (16 tokens) before --max-new-tokens; "
                   f"--max-seq-len can allocate up to {CONTEXT}\n")
    code, out, err = talis(capsys, *args, "--json")
    assert code == 0 and json.loads(out)["finish_reason"] == "context" and err.startswith("note: the reply stopped")
    code, out, err = talis(capsys, *args[:-4], "-n", 3)  # the budget ends first: no note
    assert code == 0 and err == ""


# ---------------------------------------------------------------- quantize, threads, triton


def test_quantize_writes_normal_file_modes_and_a_line_per_layer(capsys, tmp_path):
    source = save_fp16(hf_model(seed=4), tmp_path / "fp16")
    old_umask = os.umask(0o022)
    try:
        code, out, err = talis(capsys, "quantize", source, tmp_path / "q", "--method", "rtn", "--group-size", 64)
    finally:
        os.umask(old_umask)
    assert code == 0 and out == f"{tmp_path / 'q'}\n"
    assert re.fullmatch(r"quantizing: 1/2 layers \(\d+ s\)\nquantizing: 2/2 layers \(\d+ s\)\n", err), err
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "q").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_default_threads_leave_busy_cores_alone():
    from talis_cli.threads import default_threads

    assert default_threads(cores=2, load=9.0, env={}) == 1  # a busy 2-core machine: one thread
    assert default_threads(cores=2, load=0.3, env={}) == 2
    assert default_threads(cores=16, load=5.6, env={}) == 10
    assert default_threads(cores=16, load=0.0, env={}) == 16
    assert default_threads(cores=2, load=0.0, env={}, reserve=1) == 1  # talis serve: a core for HTTP and clients
    assert default_threads(cores=16, load=5.6, env={}, reserve=1) == 9
    assert default_threads(cores=1, load=0.0, env={}, reserve=1) == 1
    assert default_threads(cores=16, load=0.0, env={"OMP_NUM_THREADS": "4"}, reserve=1) == 4  # the user's word
    assert default_threads(cores=16, load=5.6, env={"OMP_NUM_THREADS": "3"}) == 3  # the user's choice stands


def test_threads_flag_sets_torchs_threads(capsys, model_dir):
    code, out, err = talis(capsys, "info", "-m", model_dir, "--json", "--threads", 2)
    assert code == 0 and json.loads(out)["parameters"] > 0, err
    assert torch.get_num_threads() == 2
    code, _, err = talis(capsys, "generate", "-p", "hi", "--threads", 0)
    assert code == 2 and "--threads" in one_line(err)


def test_triton_is_for_tests_only_and_talis_runs_without_it(model_dir):
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "triton" not in setup["options"]["install_requires"]
    assert "triton" in setup["options.extras_require"]["test"]
    script = f"""
import sys
sys.modules["triton"] = None  # as if it were not installed
from talis_cli import engine
from talis_cli.engine import Engine, LoadSettings, choose_backend
from talis_cli.errors import UsageError
from talis_cli.generation import GenerationConfig
from talis_cli.placement import DevicePlan
e = Engine.load(LoadSettings(model_dir={str(model_dir)!r}))
events = list(e.generator.stream(e.encode("In the"), GenerationConfig(max_new_tokens=3, temperature=0.0)))
class OnCuda:  # what a GPU plan says; choose_backend only reads uses_cuda
    uses_cuda = True
try:
    choose_backend("triton", e.model, OnCuda())
except UsageError as error:
    refused = str(error)
print(len(events), e.backend, engine._triton_backend_available(), choose_backend("auto", e.model, OnCuda()),
      "quant_kernels.triton_backend" in sys.modules)
print(refused)
from talis_cli.cli import main
try:
    main(["bench", "--shape", "7B"])
except SystemExit as ended:
    print(ended.code)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "3 torch_dense False torch False",
        "--backend triton needs a CUDA GPU and the triton package (pip install triton); use --backend torch on this machine",
        "1",
    ]
    assert result.stderr == "error: talis bench times the Triton kernels on a CUDA GPU: install triton (pip install triton)\n"
