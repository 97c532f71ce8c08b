"""The option groups of the `talis` commands (typer): the options of every command that loads a model and of every
command that generates text are defined once here, as dataclasses whose fields carry typer annotations;
`with_option_groups` expands them into each command's signature."""

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape as rich_escape

MODEL_PANEL, SAMPLING_PANEL, SERVER_PANEL = "Model", "Generation", "Server"


def option(*names: str, help: str, panel: str = MODEL_PANEL, default: Optional[str] = None, **kwargs):
    """An option whose value None means "not given" (the config file, preset or engine decides); `default` is
    what then applies, shown in the help as typer shows real defaults."""
    if default is not None:
        help = f"{help}  {rich_escape(f'[default: {default}]')}"
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kwargs)


def _sampling_default(name: str) -> str:
    """GenerationConfig's default of setting `name`, as the help shows it."""
    from talis_cli.generation import GenerationConfig
    from talis_cli.wording import format_setting

    return format_setting(name, getattr(GenerationConfig(), name))


def _sampling(*names: str, help: str, setting: str, **kwargs):
    return option(*names, help=help, panel=SAMPLING_PANEL, default=_sampling_default(setting), **kwargs)


@dataclass
class LoadFlags:
    """Options of every command that loads a model (None = not given: the config file or default decides)."""

    model: Annotated[Optional[Path], option("--model", "-m", metavar="DIR", help="Model folder.", default="the embedded model")] = None
    checkpoint: Annotated[Optional[Path], option("--checkpoint", metavar="FILE", help="Weights file inside or beside the model folder.")] = None
    wbits: Annotated[Optional[int], option("--wbits", metavar="BITS", help="Bits per weight when the folder does not say.")] = None
    groupsize: Annotated[Optional[int], option("--groupsize", metavar="N", help="Quantization group size when the folder does not say.")] = None
    device_map: Annotated[Optional[str], option("--device-map", metavar="NAME|FILE", help="Device map: a name from `talis presets`, a JSON file, or auto.", default="auto")] = None
    max_memory: Annotated[Optional[str], option("--max-memory", metavar="CAPS", help="Memory caps for placing layers, e.g. 0=22GiB,1=24GiB,cpu=32GiB.")] = None
    max_seq_len: Annotated[Optional[int], option("--max-seq-len", metavar="TOKENS", help="Context length to allocate.", default="the model's, at most 2048", min=2)] = None
    kv_cache: Annotated[Optional[str], option("--kv-cache", metavar="TYPE", help="KV cache type: fp16 (the model's float type), int8, or fp8 (e4m3; CPU only for now): half the memory, one scale per head and token.", default="fp16")] = None
    backend: Annotated[Optional[str], option("--backend", metavar="NAME", help="Quantized matmul backend: auto, torch, torch_dense or triton.", default="auto")] = None
    threads: Annotated[Optional[int], option("--threads", "-t", metavar="N", help="CPU threads for torch.", default="the free cores: usable cores minus the load average (serve: one fewer), at least 1; OMP_NUM_THREADS if set", min=1)] = None
    allow_pickle: Annotated[Optional[bool], option("--allow-pickle", help="Read .bin/.pt checkpoints (tensors only).")] = None
    tensor_parallel: Annotated[Optional[int], option("--tensor-parallel", metavar="N", help="Split every layer over N GPUs (N processes; on a machine without GPUs, N CPU processes).", default="1, or the device map's tensor_parallel", min=1)] = None
    tokenizer: Annotated[Optional[Path], option("--tokenizer", metavar="DIR", help="Folder of the tokenizer files (default: the model folder), e.g. the original model's.")] = None
    config: Annotated[Optional[Path], option("--config", metavar="FILE", help="File of settings (JSON, TOML or KEY=VALUE); flags win over it.")] = None


@dataclass
class SamplingFlags:
    """Options of every command that generates text (one per GenerationConfig field)."""

    preset: Annotated[Optional[str], option("--preset", metavar="NAME|FILE", help="Generation preset: a name from `talis presets`, model (the model's generation_config.json), or a JSON file.", panel=SAMPLING_PANEL)] = None
    template: Annotated[Optional[str], option("--template", metavar="NAME|FILE", help="Chat template: auto, tokenizer, llama2, llama3, chatml, raw, or a Jinja file.", panel=SAMPLING_PANEL, default="auto")] = None
    max_new_tokens: Annotated[Optional[int], _sampling("--max-new-tokens", "-n", metavar="TOKENS", help="Most tokens to generate per reply.", setting="max_new_tokens")] = None
    temperature: Annotated[Optional[float], _sampling("--temperature", metavar="T", help="Sampling temperature; 0 is greedy.", setting="temperature")] = None
    top_k: Annotated[Optional[int], _sampling("--top-k", metavar="K", help="Keep the k most likely tokens; 0 disables.", setting="top_k")] = None
    top_p: Annotated[Optional[float], _sampling("--top-p", metavar="P", help="Nucleus sampling mass in (0, 1]; 1 disables.", setting="top_p")] = None
    min_p: Annotated[Optional[float], _sampling("--min-p", metavar="P", help="Drop tokens below min-p times the top probability; 0 disables.", setting="min_p")] = None
    typical_p: Annotated[Optional[float], _sampling("--typical-p", metavar="P", help="Locally typical sampling mass; 1 disables.", setting="typical_p")] = None
    repetition_penalty: Annotated[Optional[float], _sampling("--repetition-penalty", metavar="X", help="Penalty for repeated tokens; 1 disables.", setting="repetition_penalty")] = None
    repetition_window: Annotated[Optional[int], _sampling("--repetition-window", metavar="TOKENS", help="Tokens looked back for every penalty (prompt included); 0 = the whole context.", setting="repetition_window")] = None
    frequency_penalty: Annotated[Optional[float], _sampling("--frequency-penalty", metavar="X", help="Subtracted from a token's logit once per occurrence in the window; in [-2, 2].", setting="frequency_penalty")] = None
    presence_penalty: Annotated[Optional[float], _sampling("--presence-penalty", metavar="X", help="Subtracted from a token's logit once if it occurs in the window; in [-2, 2].", setting="presence_penalty")] = None
    seed: Annotated[Optional[int], _sampling("--seed", metavar="N", help="Random seed 0..2^64-1, for reproducible sampling (the same for any --batch-size); -1 draws a fresh one.", setting="seed")] = None
    stop: Annotated[Optional[list[str]], _sampling("--stop", metavar="TEXT", help="Stop when this text appears (repeatable).", setting="stop")] = None


@dataclass
class RemoteFlags:
    """Options of the commands that can talk to a running `talis serve` instead of loading a model."""

    url: Annotated[Optional[str], option("--url", metavar="URL", help="Send the prompts to the `talis serve` at URL (e.g. http://127.0.0.1:8000) instead of loading a model; it renders, tokenizes and generates.", panel=SERVER_PANEL)] = None
    api_key: Annotated[Optional[str], option("--api-key", metavar="KEY", envvar="TALIS_API_KEY", show_envvar=False, help="The server's API key (sent as Authorization: Bearer KEY); env TALIS_API_KEY.", panel=SERVER_PANEL)] = None


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
