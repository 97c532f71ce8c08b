"""The `talis` command line (typer). Each command's docstring is its help; its body calls into the engine.

Start-up stays light: torch and the engine are imported inside the command bodies, so `talis --help`,
`talis presets` and argument errors never import torch.
"""

import dataclasses
import errno
import functools
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from talis_cli.errors import TalisError, UsageError

app = typer.Typer(
    name="talis",
    help="Run GPTQ-quantized LLaMA-family models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_PANEL, SAMPLING_PANEL = "Model", "Generation"


def _option(*names: str, help: str, panel: str = MODEL_PANEL, **kwargs):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kwargs)


@dataclass
class LoadFlags:
    """Options of every command that loads a model (None = not given: the config file or default decides)."""

    model: Annotated[Optional[Path], _option("--model", "-m", help="Model folder (default: the embedded model).")] = None
    checkpoint: Annotated[Optional[Path], _option("--checkpoint", help="Weights file inside or beside the model folder.")] = None
    wbits: Annotated[Optional[int], _option("--wbits", help="Bits per weight when the folder does not say.")] = None
    groupsize: Annotated[Optional[int], _option("--groupsize", help="Quantization group size when the folder does not say.")] = None
    device_map: Annotated[Optional[str], _option("--device-map", help="Device map: a name from `talis presets`, a JSON file, or auto.")] = None
    max_memory: Annotated[Optional[str], _option("--max-memory", help="Memory caps for placing layers, e.g. 0=22GiB,1=24GiB,cpu=32GiB.")] = None
    max_seq_len: Annotated[Optional[int], _option("--max-seq-len", help="Context length to allocate (default: the model's, at most 2048).", min=2)] = None
    backend: Annotated[Optional[str], _option("--backend", help="Quantized matmul backend: auto, torch, torch_dense or triton.")] = None
    allow_pickle: Annotated[Optional[bool], _option("--allow-pickle", help="Read .bin/.pt checkpoints (tensors only).")] = None
    tokenizer: Annotated[Optional[Path], _option("--tokenizer", help="Folder of the tokenizer files (default: the model folder), e.g. the original model's.")] = None
    config: Annotated[Optional[Path], _option("--config", help="File of settings (JSON, TOML or KEY=VALUE); flags win over it.")] = None


@dataclass
class SamplingFlags:
    """Options of every command that generates text."""

    preset: Annotated[Optional[str], _option("--preset", help="Generation preset: a name from `talis presets` or a JSON file.", panel=SAMPLING_PANEL)] = None
    template: Annotated[Optional[str], _option("--template", help="Chat template: auto, tokenizer, llama2, llama3, chatml, raw, or a Jinja file.", panel=SAMPLING_PANEL)] = None
    max_new_tokens: Annotated[Optional[int], _option("--max-new-tokens", "-n", help="Most tokens to generate per reply.", panel=SAMPLING_PANEL)] = None
    temperature: Annotated[Optional[float], _option("--temperature", help="Sampling temperature; 0 is greedy.", panel=SAMPLING_PANEL)] = None
    top_k: Annotated[Optional[int], _option("--top-k", help="Keep the k most likely tokens; 0 disables.", panel=SAMPLING_PANEL)] = None
    top_p: Annotated[Optional[float], _option("--top-p", help="Nucleus sampling mass in (0, 1]; 1 disables.", panel=SAMPLING_PANEL)] = None
    min_p: Annotated[Optional[float], _option("--min-p", help="Drop tokens below min-p times the top probability; 0 disables.", panel=SAMPLING_PANEL)] = None
    typical_p: Annotated[Optional[float], _option("--typical-p", help="Locally typical sampling mass; 1 disables.", panel=SAMPLING_PANEL)] = None
    repetition_penalty: Annotated[Optional[float], _option("--repetition-penalty", help="Penalty for repeated tokens; 1 disables.", panel=SAMPLING_PANEL)] = None
    seed: Annotated[Optional[int], _option("--seed", help="Random seed, for reproducible sampling.", panel=SAMPLING_PANEL)] = None
    stop: Annotated[Optional[list[str]], _option("--stop", help="Stop when this text appears (repeatable).", panel=SAMPLING_PANEL)] = None


def with_option_groups(command):
    """Expand each parameter annotated with a flags dataclass into that dataclass's options.

    The options are then defined once (in LoadFlags / SamplingFlags) yet appear on every command that takes the
    group; the command receives one dataclass instance per group.
    """
    signature = inspect.signature(command)
    parameters, groups = [], {}
    for parameter in signature.parameters.values():
        if dataclasses.is_dataclass(parameter.annotation):
            groups[parameter.name] = parameter.annotation
            parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                           for f in dataclasses.fields(parameter.annotation)]
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(command)
    def expanded(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)})
        return command(**kwargs)

    expanded.__signature__ = signature.replace(parameters=parameters)
    expanded.__annotations__ = {p.name: p.annotation for p in parameters}
    return expanded


def run_settings(load: LoadFlags, sampling: Optional[SamplingFlags] = None, **extra):
    """Merge the flags over the --config file (see talis_cli.settings); fail early on a missing model folder."""
    from talis_cli.settings import resolve_settings

    flags = {name: value for name, value in dataclasses.asdict(load).items() if name != "config"}
    flags.update(dataclasses.asdict(sampling) if sampling else {}, **extra)
    settings = resolve_settings(flags, load.config)
    if settings.model is not None and not settings.model.is_dir():
        raise UsageError(f"model folder {settings.model} does not exist: check --model")
    if settings.tokenizer is not None and not settings.tokenizer.is_dir():
        raise UsageError(f"tokenizer folder {settings.tokenizer} does not exist: check --tokenizer")
    if sampling is not None:
        from talis_cli.chat_templates import check_template_spec

        check_template_spec(settings.template)
    return settings


def load_engine(settings):
    """Load the model, with a progress bar on stderr when that is a terminal."""
    from talis_cli.engine import Engine
    from talis_cli.repl.render import progress_bar

    with progress_bar() as progress:
        return Engine.load(settings.load_settings(), progress=progress)


# ---------------------------------------------------------------- generate


def read_stdin_text() -> str:
    """All of stdin as text, or "" when stdin is a terminal; non-UTF-8 input is a usage error."""
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "convert it first, e.g. with iconv") from None


def collect_prompts(prompt: Optional[str], each_line: bool) -> list[str]:
    """The prompts of one `talis generate` run: stdin first, then the -p text (one per stdin line with --each-line)."""
    stdin_text = read_stdin_text()
    if each_line:
        lines = [line for line in stdin_text.splitlines() if line.strip()]
        if not lines:
            raise UsageError("--each-line needs prompts on stdin, one per line, and stdin has none")
        return [f"{line}\n{prompt}" if prompt else line for line in lines]
    stdin_text = stdin_text.removesuffix("\n")
    if prompt is None and not stdin_text.strip():
        if sys.stdin is not None and not sys.stdin.isatty():
            raise UsageError("stdin is empty: pipe some text in or pass the prompt with -p")
        raise UsageError("no prompt: pass -p TEXT or pipe text on stdin")
    return ["\n".join(part for part in (stdin_text, prompt) if part)]


@app.command()
@with_option_groups
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text (after stdin's, if both).")] = None,
    each_line: Annotated[bool, typer.Option("--each-line", help="Each stdin line is its own prompt, batched; each result is written on one line (newlines become spaces; --json keeps them).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per batch with --each-line.", min=1)] = 8,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (implies --chat).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the chat template (implied by --system and --template).")] = False,
    special: Annotated[bool, typer.Option("--special", help="Parse control-token text such as </s> in a raw prompt into control tokens (without it, prompts are plain text).")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per prompt per line.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings on stderr.")] = False,
    load: LoadFlags = None,
    sampling: SamplingFlags = None,
):
    """Generate text from a prompt (-p, or stdin) and stream it to stdout."""
    import time

    from talis_cli.repl.render import print_stats_block

    launched = time.perf_counter()
    settings = run_settings(load, sampling, system=system)
    use_chat = chat or settings.system is not None or settings.template is not None
    if special and use_chat:
        raise UsageError("--special applies to raw prompts; chat messages stay plain text (drop --special, or "
                         "--chat, --system and --template)")
    prompts = collect_prompts(prompt, each_line)
    config = settings.generation_config()
    engine = load_engine(settings)
    loaded = time.perf_counter()

    from talis_cli.repl.session import encode_prompt, with_stops

    encoded = [encode_prompt(engine, text, settings.system, settings.template, use_chat, special) for text in prompts]
    ids = [prompt_ids for prompt_ids, _ in encoded]
    config = with_stops(config, [stop for _, stops in encoded for stop in stops])

    writer = JsonLinesWriter(prompts, ids) if json_lines else StreamWriter(len(prompts), one_line=each_line)
    totals = run_batches(engine, ids, config, batch_size if each_line else 1, writer)
    if stats:
        print_stats_block(totals, load_s=loaded - launched, total_s=time.perf_counter() - launched)


def run_batches(engine, ids: list, config, batch_size: int, writer):
    """Generate for every prompt in `ids`, `batch_size` at a time, feeding `writer`; stats summed over batches."""
    from talis_cli.generation import GenerationStats

    totals = None
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        if len(batch) == 1:
            for event in engine.generator.stream(batch[0], config):
                writer.add(start, event)
        else:
            for event in engine.generator.stream_batch(batch, config):
                writer.add(start + event.index, event)
        stats = engine.generator.last_stats
        writer.end_batch(range(start, start + len(batch)), stats)
        if totals is None:
            totals = GenerationStats(0, first_token_s=stats.first_token_s)
        for name in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s"):
            setattr(totals, name, getattr(totals, name) + getattr(stats, name))
    return totals


def _write_out(text: str) -> None:
    """Write to stdout now; when the reader has gone (`| head`), stop quietly with exit code 0."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(0) from None


LINE_BREAKS_TO_SPACES = str.maketrans("\r\n", "  ")


class StreamWriter:
    """Writes each prompt's text in prompt order: the earliest unfinished prompt streams live, later ones wait.
    With `one_line`, a result's own line breaks become spaces, so line N of the output answers prompt N."""

    def __init__(self, count: int, one_line: bool = False):
        self.pending = [""] * count  # text of prompts that are not at the head yet
        self.finished = [False] * count
        self.head = 0
        self.one_line = one_line

    def add(self, index: int, event) -> None:
        text = event.text.translate(LINE_BREAKS_TO_SPACES) if self.one_line else event.text
        if index == self.head:
            _write_out(text)
        else:
            self.pending[index] += text
        if event.finish_reason is not None:
            self._finish([index])

    def end_batch(self, indices, stats) -> None:
        self._finish(indices)

    def _finish(self, indices) -> None:
        for index in indices:
            self.finished[index] = True
        while self.head < len(self.finished) and self.finished[self.head]:
            _write_out("\n")
            self.head += 1
            if self.head < len(self.pending):
                _write_out(self.pending[self.head])
                self.pending[self.head] = ""


class JsonLinesWriter:
    """One JSON object per prompt, in prompt order, each batch's objects written when the batch ends."""

    def __init__(self, prompts: list[str], ids: list):
        self.records = [dict(prompt=text, text="", prompt_tokens=len(prompt_ids), generated_tokens=0,
                             finish_reason=None) for text, prompt_ids in zip(prompts, ids)]

    def add(self, index: int, event) -> None:
        record = self.records[index]
        record["text"] += event.text
        record["generated_tokens"] += len(event.token_ids)
        record["finish_reason"] = event.finish_reason or record["finish_reason"]

    def end_batch(self, indices, stats) -> None:
        from talis_cli.repl.render import timings_of

        for index in indices:
            self.records[index]["timings"] = timings_of(stats)
            _write_out(json.dumps(self.records[index], ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- chat, info, presets, perplexity


@app.command()
@with_option_groups
def chat(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="First message to send.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    load: LoadFlags = None,
    sampling: SamplingFlags = None,
):
    """Chat with the model (/help inside lists the commands; Ctrl-D or /bye leaves)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("talis chat needs a terminal; for piped text use talis generate (--each-line: a prompt per line)")
    settings = run_settings(load, sampling, system=system)
    config = settings.generation_config()
    engine = load_engine(settings)
    from talis_cli.repl.app import run_chat
    from talis_cli.repl.session import ChatSession

    run_chat(ChatSession(engine, config, settings.template, settings.system, settings.preset), first_message=prompt)


@app.command()
@with_option_groups
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
    load: LoadFlags = None,
):
    """Describe a model: architecture, quantization, size on disk, memory for the context, device plan."""
    engine = load_engine(run_settings(load))
    if json_output:
        _write_out(json.dumps(engine.info, default=str) + "\n")
        return
    from rich.console import Console

    from talis_cli.repl.render import print_tree

    print_tree(Console(highlight=False), engine.info)


@app.command()
def presets(json_output: Annotated[bool, typer.Option("--json", help="Print them as one JSON object.")] = False):
    """List the built-in generation presets and device maps with their values."""
    from talis_cli.placement import list_device_maps
    from talis_cli.presets import list_generation_presets, load_generation_preset

    generation = {name: {key: list(value) if isinstance(value, tuple) else value
                         for key, value in dataclasses.asdict(load_generation_preset(name)).items()}
                  for name in list_generation_presets()}
    found = {"generation_presets": generation, "device_maps": list_device_maps()}
    if json_output:
        _write_out(json.dumps(found) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title="generation presets (--preset NAME)", title_justify="left", box=None)
    table.add_column("setting", style="bold")
    for name in generation:
        table.add_column(name, justify="right")
    for setting in next(iter(generation.values()), {}):
        table.add_row(setting, *(_preset_value(values[setting]) for values in generation.values()))
    console.print(table)
    console.print("\n[bold]device maps[/] (--device-map NAME, or a JSON file)")
    for name, mapping in found["device_maps"].items():
        console.print(f"  {name}: {json.dumps(mapping)}", markup=False)


def _preset_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(value) or "-"
    return "-" if value is None else str(value)


@app.command()
@with_option_groups
def perplexity(
    file: Annotated[Path, typer.Option("--file", "-f", help="UTF-8 text file to score.")],
    ctx: Annotated[int, typer.Option("--ctx", help="Tokens per window.", min=2)] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens scored per window (default: ctx).", min=1)] = None,
    load: LoadFlags = None,
):
    """Perplexity of a model on a text file, over windows of --ctx tokens (lower is better)."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"text file {file} does not exist: check --file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not UTF-8 text; convert it first, e.g. with iconv") from None
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror or exc}; check --file") from None
    engine = load_engine(run_settings(load))
    from talis_cli.perplexity import perplexity as windowed_perplexity

    _write_out(f"{windowed_perplexity(engine, text, ctx, stride):.4f}\n")


# ---------------------------------------------------------------- quantize, bench


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="Folder of the fp16/bf16/fp32 model (config.json, weights, tokenizer).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the GPTQ model to.")],
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="Weights per scale; -1 for one group per column.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order", help="Quantize columns by decreasing Hessian diagonal.")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Plain-text calibration file (needed by gptq).")] = None,
    method: Annotated[str, typer.Option("--method", help="gptq (needs --calib) or rtn (round to nearest).")] = "gptq",
    nsamples: Annotated[int, typer.Option("--nsamples", help="Calibration sequences.", min=1)] = 128,
    seqlen: Annotated[int, typer.Option("--seqlen", help="Tokens per calibration sequence.", min=2)] = 2048,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Folder of the tokenizer files (default: the model folder); they are copied to OUT_DIR.")] = None,
):
    """Quantize a model to GPTQ, writing the AutoGPTQ layout that `talis --model OUT_DIR` loads."""
    from talis_cli.quantize import quantize_model
    from talis_cli.repl.render import progress_bar

    with progress_bar("quantizing", "steps", min_seconds=0) as progress:
        written = quantize_model(model_dir, out_dir, bits=bits, group_size=group_size, act_order=act_order,
                                 method=method, calib_file=calib, nsamples=nsamples, seqlen=seqlen, progress=progress,
                                 tokenizer_dir=tokenizer)
    _write_out(f"{written}\n")


@app.command()
def bench(
    shape: Annotated[Optional[str], typer.Option("--shape", help="Random weights of a LLaMA shape: 7B, 13B, 33B, 65B, 70B, 8B.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A real model folder instead of --shape.")] = None,
    prompt: Annotated[int, typer.Option("--prompt", help="Prompt tokens.")] = 128,
    gen: Annotated[int, typer.Option("--gen", help="Tokens to generate.")] = 128,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context to allocate (default: prompt + gen).")] = None,
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight for --shape: 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="Group size for --shape.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order", help="Act-order weights for --shape.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Also time each quantized GEMV shape.")] = False,
    device_map: Annotated[Optional[str], typer.Option("--device-map", help="Device map for --model.")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Folder of the tokenizer files for --model (default: the model folder).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
):
    """Time decode and prefill on the GPU next to fp16 (cuBLAS) and torch's int4 kernel, against the bandwidth floor."""
    from talis_cli.bench import format_report, run_bench

    report = run_bench(shape=shape, model=model, prompt=prompt, gen=gen, ctx=ctx, bits=bits, group_size=group_size,
                       act_order=act_order, json_out=json_output, kernels=kernels, device_map=device_map,
                       tokenizer=tokenizer)
    _write_out(json.dumps(report, default=str) + "\n" if json_output else format_report(report) + "\n")


# ---------------------------------------------------------------- entry point


def _report_error(message: str) -> None:
    from rich.text import Text

    from talis_cli.repl.render import stderr_console

    stderr_console().print(Text.assemble(("error: ", "bold red"), message))


def _silence_stdout() -> None:
    """After the reader of a pipe left: point stdout at /dev/null so the exit-time flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Optional[list] = None) -> None:
    """Console-script entry point: one line on stderr for every error the user can cause, and exit codes
    0 success, 1 runtime error, 2 bad usage, 130 interrupted."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="talis", standalone_mode=False)  # Ctrl-C: returns 130
    except SystemExit as exc:
        # click ends a write into a pipe whose reader has gone (`talis --help | head -1`) with exit 1; like
        # `_write_out`, stop quietly with 0
        if not (isinstance(exc.__context__, OSError) and exc.__context__.errno == errno.EPIPE):
            raise
        _silence_stdout()
        code = 0
    except TalisError as exc:
        _report_error(str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except Exception as exc:
        code = _report_unexpected(exc)
    sys.exit(code if isinstance(code, int) else 0)


def _report_unexpected(exc: Exception) -> int:
    """Exit code for click's argument errors and CUDA running out of memory (one line each); re-raise the rest."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # bare `talis`: the help is the answer, not an error
        _write_out(exc.format_message().strip() and exc.format_message() + "\n")  # typer's rich help printed itself
        return 0
    if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):  # click's errors
        context = getattr(exc, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None and exc.exit_code == 2 else ""
        _report_error(exc.format_message() + hint)
        return exc.exit_code
    from talis_cli.repl.render import oom_message

    message = oom_message(exc)
    if message is None:
        raise exc
    _report_error(message)
    return 1
