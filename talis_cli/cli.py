"""The `talis` command line (typer). Each command's docstring is its help; its body calls into the engine.

Start-up stays light: torch and the engine are imported inside the command bodies, so `talis --help`,
`talis presets` and argument errors never import torch.
"""

import dataclasses
import errno
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


from talis_cli.errors import TalisError, UsageError
from talis_cli.flags import LoadFlags, RemoteFlags, SamplingFlags, option, with_option_groups
from talis_cli.output import silence_stdout as _silence_stdout
from talis_cli.output import write_out as _write_out

app = typer.Typer(
    name="talis",
    help="Run GPTQ-quantized LLaMA-family models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def package_version() -> str:
    """talis's version from the installed package's metadata (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("talis")
    except PackageNotFoundError:
        from talis_cli import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        _write_out(f"talis {package_version()}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
):
    """Run GPTQ-quantized LLaMA-family models from a terminal."""


def run_settings(load: LoadFlags, sampling: Optional[SamplingFlags] = None, **extra):
    """Merge the flags over the --config file (see talis_cli.settings); fail early on a missing model folder."""
    from talis_cli.settings import resolve_settings

    flags = {name: value for name, value in dataclasses.asdict(load).items() if name != "config"}
    flags.update(dataclasses.asdict(sampling) if sampling else {}, **extra)
    settings = resolve_settings(flags, load.config)
    if settings.model is not None and not settings.model.is_dir():
        raise UsageError(f"model folder {settings.model} does not exist: check --model")
    if settings.checkpoint is not None and not settings.checkpoint.is_file():
        raise UsageError(f"checkpoint file {settings.checkpoint} does not exist: check --checkpoint")
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
    if each_line:  # every line is a prompt, blank ones too: result N goes on line N
        lines = stdin_text.splitlines()
        if not lines:
            raise UsageError("--each-line needs prompts on stdin, one per line, and stdin has none")
        return [f"{line}\n{prompt}" if prompt and line.strip() else line for line in lines]
    stdin_text = stdin_text.removesuffix("\n")
    if prompt is None and not stdin_text.strip():
        if sys.stdin is not None and not sys.stdin.isatty():
            raise UsageError("stdin is empty: pipe some text in or pass the prompt with -p")
        raise UsageError("no prompt: pass -p TEXT or pipe text on stdin")
    return ["\n".join(part for part in (stdin_text, prompt) if part)]


@app.command()
@with_option_groups
def generate(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt text (after stdin's, if both).")] = None,
    each_line: Annotated[bool, typer.Option("--each-line", help="Each stdin line is its own prompt, batched; each result is written on one line (newlines become spaces; --json keeps them).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Prompts generated at once with --each-line (continuous batching: a finished line's place goes to the next line at once).", min=1)] = 8,
    system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="System prompt (implies --chat).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the chat template (implied by --system and --template).")] = False,
    special: Annotated[bool, typer.Option("--special", help="Parse control-token text such as </s> in a raw prompt into control tokens (without it, prompts are plain text).")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per prompt per line.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings on stderr.")] = False,
    load: LoadFlags = None,
    sampling: SamplingFlags = None,
    remote: RemoteFlags = None,
):
    """Generate text from a prompt (-p, or stdin) and stream it to stdout (from a model loaded here, or from a running `talis serve` with --url)."""
    import time

    from talis_cli.repl.render import ContextFullNotice, print_stats_block

    launched = time.perf_counter()
    if remote.url:
        _refuse_local_flags(load, sampling, special)
    settings = run_settings(load, sampling, system=system)
    use_chat = chat or settings.system is not None or settings.template is not None
    if special and use_chat:
        raise UsageError("--special applies to raw prompts; chat messages stay plain text (drop --special, or "
                         "--chat, --system and --template)")
    texts = collect_prompts(prompt, each_line)
    config = settings.generation_config()
    if remote.url:
        from talis_cli.remote.generate import generate_remote

        failed = generate_remote(remote.url, remote.api_key, texts, _with_run_seed(config),
                                 system=settings.system if use_chat else None, chat=use_chat, each_line=each_line,
                                 concurrency=batch_size, json_lines=json_lines, show_stats=stats, launched=launched,
                                 on_error=_report_error)
        if failed:
            raise typer.Exit(1)
        return
    engine = load_engine(settings)
    loaded = time.perf_counter()

    from talis_cli.oneshot import (JsonLinesWriter, StreamWriter, check_prompts, encode_prompts, run_batches,
                                   run_scheduled)
    from talis_cli.repl.session import encode_prompt, with_stops

    prompts, stops = encode_prompts(
        texts, lambda text: encode_prompt(engine, text, settings.system, settings.template, use_chat, special), each_line)
    config = with_stops(config, stops)
    if each_line:  # a line that cannot run gets an empty result; the others still run
        check_prompts(engine.generator, prompts, config)

    config = _with_run_seed(config)
    writer = JsonLinesWriter(prompts, config.seed) if json_lines else StreamWriter(len(prompts), one_line=each_line)
    writer = ContextFullNotice(writer)  # a note on stderr for replies cut by the full context
    run = run_scheduled if each_line else run_batches  # one prompt: the generator's own path, as fast as it is
    totals = run(engine.generator, prompts, config, batch_size if each_line else 1, writer, on_error=_report_error)
    writer.report(engine, len(prompts))
    if stats and totals is not None:
        # the engine's phases, after the command's own work before it (flags, --config file, stdin)
        phases = {"command setup": loaded - launched - engine.load_s, **engine.load_phases.phases}
        later = getattr(engine.generator.fast_decode, "later_captures", None)  # lazily captured CUDA graphs
        print_stats_block(totals, load_s=loaded - launched, total_s=time.perf_counter() - launched,
                          load_phases=phases, seed=config.seed, graph_captures=later() if later else None)
    if any(p.error for p in prompts):
        raise typer.Exit(1)


def _with_run_seed(config):
    """`config` with one fresh seed for the run when it samples without one (shown, for --seed to repeat)."""
    if config.seed is None and config.temperature > 0:
        import secrets

        return config.with_overrides(seed=secrets.randbits(53))  # exact in every JSON reader (doubles)
    return config


def _refuse_local_flags(load: LoadFlags, sampling: SamplingFlags, special: bool = False) -> None:
    """With --url, a flag only a local model uses is a usage error (the server's model answers)."""
    from talis_cli.remote.generate import refuse_local_flags

    refuse_local_flags(load, {"--template": sampling.template, "--special": special,
                              "--preset model": sampling.preset == "model"})


# ---------------------------------------------------------------- chat, info, presets, perplexity


@app.command()
@with_option_groups
def chat(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", help="First message to send.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="System prompt.")] = None,
    load: LoadFlags = None,
    sampling: SamplingFlags = None,
    remote: RemoteFlags = None,
):
    """Chat with the model, or with a running `talis serve` (--url) (/help inside lists the commands; Ctrl-D or /bye leaves)."""
    if remote.url:
        _refuse_local_flags(load, sampling)
    settings = run_settings(load, sampling, system=system)  # a missing file is named first
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("talis chat needs a terminal; for piped text use talis generate (--each-line: a prompt per line)")
    config = settings.generation_config()
    _refuse_tensor_parallel(settings, "talis chat")
    from talis_cli.repl.app import run_chat

    if remote.url:
        from talis_cli.remote.chat import RemoteChatSession

        session = RemoteChatSession.connect(remote.url, remote.api_key, config, settings.system, settings.preset)
    else:
        from talis_cli.repl.session import ChatSession
        from talis_cli.warm_up import BackgroundWarmUp

        engine = load_engine(settings)
        # kernels compile and CUDA graphs are captured while the first message is typed (nothing on a CPU)
        session = ChatSession(engine, config, settings.template, settings.system, settings.preset,
                              BackgroundWarmUp(engine.generator).start())
    run_chat(session, first_message=prompt)


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
    console.print("  model: the model folder's generation_config.json values (talis info)")
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
    file: Annotated[Path, typer.Option("--file", "-f", metavar="FILE", help="UTF-8 text file to score.")],
    ctx: Annotated[int, typer.Option("--ctx", metavar="TOKENS", help="Tokens per window (at most the context, --max-seq-len).", min=2)] = 512,
    stride: Annotated[Optional[int], option("--stride", metavar="TOKENS", help="Tokens scored per window.", panel=None, default="--ctx", min=1)] = None,
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
    settings = run_settings(load)
    from talis_cli.perplexity import allocate_for_window

    settings.max_seq_len = allocate_for_window(settings.model, ctx, settings.max_seq_len)
    engine = load_engine(settings)
    from talis_cli.perplexity import perplexity as windowed_perplexity

    _write_out(f"{windowed_perplexity(engine, text, ctx, stride):.4f}\n")


# ---------------------------------------------------------------- serve


@app.command()
@with_option_groups
def serve(
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port; 0 picks a free one.", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="TALIS_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on /v1/ requests.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="N", help="Requests decoded together at most.", min=1)] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", help="Requests waiting at most; more get 429.", min=0)] = 64,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", metavar="ORIGIN", help="Browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable).")] = None,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", metavar="SECONDS", help="On SIGINT/SIGTERM, time running requests get to finish before they are cancelled.", min=0)] = 10.0,
    system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="System prompt for chat requests that bring none.")] = None,
    load: LoadFlags = None,
    sampling: SamplingFlags = None,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions) with a chat page at /.

    The generation flags are the defaults; each request may override them. Ctrl-C or SIGTERM stops it."""
    settings = run_settings(load, sampling, system=system)
    config = settings.generation_config()
    _refuse_tensor_parallel(settings, "talis serve")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key (or TALIS_API_KEY) is empty; give a key, or leave it unset for no key")
    from talis_cli.server.run import serve as run_server

    run_server(settings, config, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
               cors_origins=tuple(cors_origin or ()), drain_s=drain_timeout,
               announce=lambda line: _write_out(line + "\n"))


# ---------------------------------------------------------------- quantize, bench


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", show_default=False, help="Folder of the fp16/bf16/fp32 model (config.json, weights, tokenizer).")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", show_default=False, help="Folder to write the GPTQ model to.")],
    bits: Annotated[int, typer.Option("--bits", metavar="BITS", help="Bits per weight: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", metavar="N", help="Weights per scale; -1 for one group per column.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order", help="Quantize columns by decreasing Hessian diagonal.")] = False,
    calib: Annotated[Optional[Path], typer.Option("--calib", metavar="FILE", help="Plain-text calibration file (needed by gptq).")] = None,
    method: Annotated[str, typer.Option("--method", metavar="NAME", help="gptq (needs --calib) or rtn (round to nearest).")] = "gptq",
    nsamples: Annotated[int, typer.Option("--nsamples", metavar="N", help="Calibration sequences.", min=1)] = 128,
    seqlen: Annotated[int, typer.Option("--seqlen", metavar="TOKENS", help="Tokens per calibration sequence.", min=2)] = 2048,
    threads: Annotated[Optional[int], option("--threads", "-t", metavar="N", help="CPU threads for torch.", panel=None, default="as for the other commands", min=1)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="DIR", help="Folder of the tokenizer files (default: the model folder); they are copied to OUT_DIR.")] = None,
):
    """Quantize a model to GPTQ, writing the AutoGPTQ layout that `talis generate --model OUT_DIR` loads.

    On a terminal a progress bar shows each step; otherwise one line per finished layer goes to stderr."""
    if not model_dir.is_dir():
        raise UsageError(f"model folder {model_dir} does not exist: check MODEL_DIR")
    if calib is not None and not calib.is_file():
        raise UsageError(f"calibration file {calib} does not exist: check --calib")
    from talis_cli.quantize import quantize_model
    from talis_cli.repl.render import progress_bar
    from talis_cli.threads import set_threads

    set_threads(threads)
    with progress_bar("quantizing", "layers", min_seconds=0, lines=True) as progress:
        written = quantize_model(model_dir, out_dir, bits=bits, group_size=group_size, act_order=act_order,
                                 method=method, calib_file=calib, nsamples=nsamples, seqlen=seqlen, progress=progress,
                                 tokenizer_dir=tokenizer)
    _write_out(f"{written}\n")


@app.command()
def bench(
    shape: Annotated[Optional[str], typer.Option("--shape", metavar="NAME", help="Random weights of a LLaMA shape: 7B, 13B, 33B, 65B, 70B, 8B.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR", help="A real model folder instead of --shape.")] = None,
    prompt: Annotated[int, typer.Option("--prompt", metavar="TOKENS", help="Prompt tokens.")] = 128,
    gen: Annotated[int, typer.Option("--gen", metavar="TOKENS", help="Tokens to generate.")] = 128,
    ctx: Annotated[Optional[int], option("--ctx", metavar="TOKENS", help="Context to allocate.", panel=None, default="--prompt + --gen")] = None,
    bits: Annotated[int, typer.Option("--bits", metavar="BITS", help="Bits per weight for --shape: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", metavar="N", help="Group size for --shape.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order", help="Act-order weights for --shape.")] = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Also time each quantized GEMV shape.")] = False,
    device_map: Annotated[Optional[str], typer.Option("--device-map", metavar="NAME|FILE", help="Device map for --model, or where --shape's random layers go (one CUDA graph per GPU).")] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", metavar="CAPS", help="Memory caps for placing layers, e.g. 0=24GiB,1=24GiB.")] = None,
    tensor_parallel: Annotated[Optional[int], typer.Option("--tensor-parallel", metavar="N", help="Time --shape split over N GPUs (tensor parallel, one process per GPU), with an all-reduce table.", min=1)] = None,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="Also time fp16 (cuBLAS) and torch's int4 kernel.")] = True,
    kv_cache: Annotated[str, typer.Option("--kv-cache", metavar="TYPE", help="KV cache type of every row: fp16, int8 or fp8.")] = "fp16",
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", metavar="DIR", help="Folder of the tokenizer files for --model (default: the model folder).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
):
    """Time decode and prefill on the GPU next to fp16 (cuBLAS) and torch's int4 kernel, against the bandwidth floor."""
    from talis_cli.kv_cache import check_kind

    check_kind(kv_cache)  # a bad value is a usage error on any machine, before the GPU's requirements
    try:
        from talis_cli.bench import format_report, run_bench
    except ImportError as exc:  # triton is not installed with talis on CPU-only machines
        if not (exc.name or "").startswith("triton"):
            raise
        raise TalisError("talis bench times the Triton kernels on a CUDA GPU: install triton (pip install triton)") from None

    report = run_bench(shape=shape, model=model, prompt=prompt, gen=gen, ctx=ctx, bits=bits, group_size=group_size,
                       act_order=act_order, json_out=json_output, kernels=kernels, device_map=device_map,
                       tokenizer=tokenizer, max_memory=max_memory, tensor_parallel=tensor_parallel,
                       baselines=baselines, kv_cache=kv_cache)
    _write_out(json.dumps(report, default=str) + "\n" if json_output else format_report(report) + "\n")


def _refuse_tensor_parallel(settings, command: str) -> None:
    """UsageError when `settings` ask for tensor parallelism, which `command` does not run."""
    from talis_cli.placement import load_device_map
    from talis_cli.tensor_parallel import requested_size

    label, raw_map = load_device_map(settings.device_map)
    if requested_size(settings.tensor_parallel, raw_map, f"device map {label}") > 1:
        raise UsageError(f"{command} does not run with tensor parallelism yet; use talis generate "
                         f"--tensor-parallel N, or drop --tensor-parallel")


# ---------------------------------------------------------------- entry point


def _report_error(message: str) -> None:
    from rich.text import Text

    from talis_cli.repl.render import stderr_console

    stderr_console().print(Text.assemble(("error: ", "bold red"), message))


def main(argv: Optional[list] = None) -> None:
    """Console-script entry point: one line on stderr for every error the user can cause, and exit codes
    0 success, 1 runtime error, 2 bad usage, 130 interrupted."""
    command = typer.main.get_command(app)
    _tidy_help(command)
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


def _tidy_help(command) -> None:
    """Help as users read it: a flag shows no value type (typer prints `<bool>`), and an argument shows its
    metavar alone (MODEL_DIR, not `{model_dir} <path>`)."""
    import click

    root = click.Context(command, info_name="talis", **command.context_settings)  # -h and --help
    for sub in [command, *getattr(command, "commands", {}).values()]:
        help_option = sub.get_help_option(root if sub is command else click.Context(sub, parent=root, info_name=sub.name))
        for param in [*sub.params, *([help_option] if help_option else [])]:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            if param.param_type_name == "argument" and param.metavar:
                # instance attributes over typer's methods: the usage line and the type column
                param._usage_display_name = lambda metavar=param.metavar: metavar
                param.display_type_rich = lambda ctx: None


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
