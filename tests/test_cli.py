"""`talis` as users run it: subprocesses with real pipes, stdin, exit codes and signals, on a tiny 4-bit model.

Every generated text is compared with the engine called in-process with the same greedy settings.
"""

import json
import os
import pty
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import hf_model, save_gptq

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--temperature", "0", "-n", "12"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_model")
    save_gptq(hf_model(seed=3, max_position_embeddings=512), folder, bits=4, group_size=64)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir):
    from talis_cli.engine import Engine, LoadSettings

    return Engine.load(LoadSettings(model_dir=model_dir))


def greedy_text(engine, ids_list, max_new_tokens=12) -> list:
    """Reference: the texts the engine itself generates greedily for each prompt of one batch."""
    from talis_cli.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    texts = [""] * len(ids_list)
    for event in engine.generator.stream_batch(ids_list, config):
        texts[event.index] += event.text
    return texts


def talis_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def run_talis(*args, stdin: bytes = b"", env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "talis_cli", *map(str, args)], input=stdin, capture_output=True,
                          cwd=REPO, env=env or talis_env(), timeout=timeout)


def one_line_error(result) -> str:
    """The stderr of a failed run: exactly one line starting with 'error:' and no traceback."""
    text = result.stderr.decode()
    assert text.startswith("error: ") and text.count("\n") == 1, text
    return text


# ---------------------------------------------------------------- generate modes


def test_prompt_flag_streams_the_engines_greedy_text(model_dir, engine, tmp_path):
    config = tmp_path / "talis.toml"  # the sampling settings come from a config file, the model from a flag
    config.write_text("temperature = 0\nmax-new-tokens = 12\ntop_k = 5\n")
    result = run_talis("generate", "-m", model_dir, "-p", "In the beginning", "--config", config)
    assert result.returncode == 0, result.stderr.decode()
    expected = greedy_text(engine, [engine.encode("In the beginning")])[0]
    assert result.stdout.decode() == expected + "\n"
    assert result.stderr == b""


def test_stdin_then_prompt_flag_in_json(model_dir, engine):
    result = run_talis("generate", "-m", model_dir, "-p", "and the earth", "--json", *GREEDY,
                       stdin=b"In the beginning\n")
    assert result.returncode == 0, result.stderr.decode()
    [record] = [json.loads(line) for line in result.stdout.decode().splitlines()]
    prompt = "In the beginning\nand the earth"
    ids = engine.encode(prompt)
    assert record["prompt"] == prompt
    assert record["prompt_tokens"] == len(ids)
    assert record["text"] == greedy_text(engine, [ids])[0]
    assert record["generated_tokens"] == 12 and record["finish_reason"] == "length"
    assert set(record["timings"]) >= {"prefill_s", "decode_s", "first_token_s", "decode_tok_s"}


def test_stdin_alone_is_one_prompt(model_dir, engine):
    stdin = "Let there be light\nand there was light\n"
    result = run_talis("generate", "-m", model_dir, "--stats", *GREEDY, stdin=stdin.encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == greedy_text(engine, [engine.encode(stdin.removesuffix("\n"))])[0] + "\n"
    stats = result.stderr.decode()
    assert "prompt eval rate:" in stats and "eval count:           12 token(s)" in stats


def test_each_line_gives_one_result_per_line_in_order(model_dir, engine):
    lines = ["And God said", "the waters under the heaven", "be gathered together unto one place"]
    stdin = ("\n".join(lines) + "\n").encode()
    as_json = run_talis("generate", "-m", model_dir, "--each-line", "--json", *GREEDY, stdin=stdin)
    as_text = run_talis("generate", "-m", model_dir, "--each-line", "--batch-size", "2", *GREEDY, stdin=stdin)
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    records = [json.loads(line) for line in as_json.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == lines
    expected = greedy_text(engine, [engine.encode(line) for line in lines])
    assert [r["text"] for r in records] == expected
    # batches of two then one: the text output keeps the same order
    expected_pairs = greedy_text(engine, [engine.encode(line) for line in lines[:2]]) + expected[2:]
    one_line = [text.translate(str.maketrans("\r\n", "  ")) for text in expected_pairs]  # line N answers prompt N
    assert as_text.stdout.decode() == "".join(text + "\n" for text in one_line)
    assert as_text.stdout.decode().count("\n") == len(lines)


def test_system_prompt_goes_through_the_chat_template(model_dir, engine):
    from talis_cli.chat_templates import BUILTIN_TEMPLATES
    from talis_cli.repl.session import render_chat

    result = run_talis("generate", "-m", model_dir, "-p", "Who made the light?", "--system", "Answer briefly.",
                       "--template", "chatml", "--json", *GREEDY)
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout)
    ids = render_chat(engine, BUILTIN_TEMPLATES["chatml"], "Answer briefly.",
                      [{"role": "user", "content": "Who made the light?"}])
    assert record["prompt_tokens"] == len(ids)
    assert record["text"] == greedy_text(engine, [ids])[0]


# ---------------------------------------------------------------- errors and exit codes


@pytest.mark.parametrize("args, stdin, needle", [
    (["--preset", "no-such-preset"], b"", "unknown preset 'no-such-preset'"),
    (["--template", "no-such-template"], b"", "unknown chat template 'no-such-template'"),
    (["--temperature", "-0.5"], b"", "temperature = -0.5 is out of range: allowed >= 0"),
    (["--top-p", "1.5"], b"", "top_p = 1.5 is out of range"),
    (["--max-new-tokens", "many"], b"", "Invalid value for '--max-new-tokens'"),
    ([], b"", "stdin is empty"),
    ([], b"\xff\xfeIn the beginning", "stdin is not UTF-8"),
])
def test_bad_usage_exits_2_with_one_line(model_dir, args, stdin, needle):
    prompt = ["-p", "hello"] if "stdin" not in needle else []
    result = run_talis("generate", "-m", model_dir, *prompt, *args, stdin=stdin)
    assert result.returncode == 2
    assert needle in one_line_error(result)
    assert result.stdout == b""


def test_missing_model_folder_exits_2(tmp_path):
    result = run_talis("generate", "-m", tmp_path / "absent", "-p", "hello")
    assert result.returncode == 2
    assert f"model folder {tmp_path / 'absent'} does not exist" in one_line_error(result)


def test_chat_without_a_terminal_points_to_generate():
    result = run_talis("chat", stdin=b"hello\n")
    assert result.returncode == 2 and "use talis generate" in one_line_error(result)


def test_prompt_longer_than_the_context_says_by_how_much(model_dir, engine):
    prompt = "And the evening and the morning were the first day. " * 4
    result = run_talis("generate", "-m", model_dir, "--max-seq-len", "16", "-p", prompt)
    assert result.returncode == 1
    over = len(engine.encode(prompt)) - 15  # one slot stays free for the first new token
    assert f"{over} too many for a context of 16" in one_line_error(result)


def test_usage_errors_and_help_do_not_import_torch(model_dir):
    for args in ([], ["--help"], ["generate", "--no-such-flag"], ["generate", "-m", model_dir, "--preset"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "talis_cli", *map(str, args)],
                                capture_output=True, cwd=REPO, env=talis_env(), timeout=60)
        imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
        assert "typer" in imported and "torch" not in imported, args
        assert result.returncode == (0 if len(args) < 2 else 2)
        assert (b"Usage: talis" in result.stdout) == (len(args) < 2)


def test_presets_do_not_import_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "talis_cli", "presets"],
                            capture_output=True, cwd=REPO, env=talis_env(), timeout=60)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines() if "|" in line}
    assert "torch" not in imported


@pytest.fixture(scope="module")
def embedded_run() -> tuple:
    """(modules imported, --stats lines) of `talis generate --stats` on the embedded model under -X importtime."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "talis_cli", "generate", "-p", "In the beginning",
                             "--stats", *GREEDY], capture_output=True, cwd=REPO, env=talis_env(), timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    lines = result.stderr.decode().splitlines()
    return {line.split("|")[-1].strip() for line in lines if "|" in line}, [line for line in lines if "|" not in line]


def test_generate_on_the_embedded_model_imports_only_what_it_uses(embedded_run):
    """The way to the first token imports torch and tokenizers, not transformers (nor what it pulls in)."""
    imported, _ = embedded_run
    assert {"torch", "tokenizers", "talis_cli.tokenizer_file"} <= imported
    assert not {name for name in imported if name.split(".")[0] in ("transformers", "sympy", "accelerate")}


def test_stats_break_the_load_down_by_phase(embedded_run):
    _, stats = embedded_run
    seconds = {name.strip(): float(value.removesuffix(" s")) for name, value in
               (line.split(":", 1) for line in stats if line.endswith(" s"))}
    phases = {name: seconds[name] for name in ("command setup", "imports", "config and plan", "tokenizer",
                                               "weights read", "backend prepare", "KV cache")}
    assert "CUDA graphs" not in seconds  # captured only on a GPU
    assert min(phases.values()) >= 0
    assert abs(sum(phases.values()) - seconds["load duration"]) <= 0.0005 * len(phases)  # printed in ms
    assert seconds["total duration"] >= seconds["load duration"]


def _stderr_through_a_terminal(args, env) -> bytes:
    """Run talis with stderr on a pseudo-terminal (so colour would be on) and return what it wrote there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "talis_cli", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=follower, cwd=REPO, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks)


def test_no_color_is_respected_on_a_terminal():
    args = ["generate", "-p", "hello", "--preset", "no-such-preset"]
    coloured = _stderr_through_a_terminal(args, talis_env(TERM="xterm-256color"))
    plain = _stderr_through_a_terminal(args, talis_env(TERM="xterm-256color", NO_COLOR="1"))
    red = b"31m"  # the SGR code of the red "error:" label
    assert red in coloured and b"unknown preset" in coloured
    assert red not in plain and b"unknown preset" in plain


# ---------------------------------------------------------------- pipes and signals


def test_closed_pipe_ends_quietly(model_dir):
    process = subprocess.Popen([sys.executable, "-m", "talis_cli", "generate", "-m", model_dir, "-p", "In the",
                                "-n", "400", "--temperature", "1", "--seed", "1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, env=talis_env())
    head = process.stdout.read(20)  # like `| head -c 20`
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0
    assert len(head) == 20 and stderr == b""


@pytest.mark.parametrize("args", [["--help"], ["presets"]])
def test_output_into_a_pipe_already_closed_exits_0(args):
    """`talis --help | head -1`: click turns the failed write into exit 1; talis ends quietly with 0 instead."""
    process = subprocess.Popen([sys.executable, "-m", "talis_cli", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=talis_env())
    process.stdout.close()  # the reader is gone before talis writes anything
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0 and stderr == b""


def default_sigint() -> None:
    """In a child: SIGINT's default action, even when the tests run where it is ignored (a shell's background
    job ignores it, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_generation_exits_130(model_dir):
    process = subprocess.Popen([sys.executable, "-m", "talis_cli", "generate", "-m", model_dir, "-p", "In the",
                                "-n", "100000", "--temperature", "1", "--seed", "2", "--stop", "no-stop"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, env=talis_env(), preexec_fn=default_sigint)
    ready, _, _ = select.select([process.stdout], [], [], 60)
    assert ready, "no output within a minute"
    process.stdout.read1(1)  # generation has started
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert b"Traceback" not in process.stderr.read()


# ---------------------------------------------------------------- the other commands


def test_info_json_counts_the_models_parameters(model_dir):
    result = run_talis("info", "-m", model_dir, "--json")
    assert result.returncode == 0, result.stderr.decode()
    facts = json.loads(result.stdout)
    model = hf_model(seed=3, max_position_embeddings=512)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["quantization"]["bits"] == 4 and facts["quantization"]["group_size"] == 64


def test_presets_lists_every_preset_with_its_values():
    from talis_cli.placement import list_device_maps
    from talis_cli.presets import list_generation_presets, load_generation_preset

    result = run_talis("presets", "--json")
    assert result.returncode == 0, result.stderr.decode()
    listed = json.loads(result.stdout)
    assert list(listed["generation_presets"]) == list_generation_presets()
    for name, values in listed["generation_presets"].items():
        assert values["temperature"] == load_generation_preset(name).temperature
    assert listed["device_maps"] == list_device_maps()


def test_perplexity_matches_the_library_function(model_dir, engine, tmp_path):
    from talis_cli.perplexity import perplexity

    text = (REPO / "tests" / "data" / "kjv" / "heldout.txt").read_text(encoding="utf-8")[:3000]
    (tmp_path / "sample.txt").write_text(text, encoding="utf-8")
    result = run_talis("perplexity", "-m", model_dir, "--file", tmp_path / "sample.txt", "--ctx", "64")
    assert result.returncode == 0, result.stderr.decode()
    assert float(result.stdout) == pytest.approx(perplexity(engine, text, 64, None), rel=1e-3)


def test_quantize_writes_what_the_library_writes(tmp_path):
    from safetensors.torch import load_file

    from talis_cli.quantize import quantize_model
    from tests.tiny_models import save_fp16

    source = save_fp16(hf_model(seed=4), tmp_path / "fp16")
    result = run_talis("quantize", source, tmp_path / "cli", "--method", "rtn", "--bits", "4", "--group-size", "64")
    assert result.returncode == 0, result.stderr.decode()
    quantize_model(source, tmp_path / "library", bits=4, group_size=64, method="rtn")
    ours, reference = (load_file(str(next((tmp_path / name).glob("*.safetensors")))) for name in ("cli", "library"))
    assert ours.keys() == reference.keys()
    assert all((ours[name] == reference[name]).all() for name in ours)
    bad = run_talis("quantize", source, tmp_path / "other", "--method", "gptq")  # gptq needs --calib
    assert bad.returncode == 2 and "--calib" in one_line_error(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_stats_report_vram_and_the_text_matches_the_engine():
    from talis_cli.engine import Engine, LoadSettings

    result = run_talis("generate", "-p", "In the beginning", "--json", "--stats", *GREEDY)
    assert result.returncode == 0, result.stderr.decode()
    memory_line = next(line for line in result.stderr.decode().splitlines() if line.startswith("memory:"))
    assert "GPU0" in memory_line and "GiB" in memory_line
    engine = Engine.load(LoadSettings())
    record = json.loads(result.stdout)
    assert record["text"] == greedy_text(engine, [engine.encode("In the beginning")])[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_without_a_gpu_says_so_in_one_line():
    result = run_talis("bench", "--shape", "7B", "--gen", "4")
    assert result.returncode == 1 and "needs a CUDA GPU" in one_line_error(result)


def test_every_commands_summary_is_one_line():
    """typer's rich help keeps a docstring's line breaks: a summary written over two lines is cut mid-sentence in
    `talis --help`'s command list."""
    import typer

    from talis_cli.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        summary = (command.help or "").strip().split("\n\n")[0]
        assert summary and "\n" not in summary, name
