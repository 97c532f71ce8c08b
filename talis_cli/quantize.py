"""`talis quantize`: quantize an fp16 LLaMA-family model layer by layer and write the AutoGPTQ layout.

GPTQ runs calibration samples through the embeddings, then through one decoder layer at a time: the inputs of
each linear are captured with forward hooks, the linear is quantized and its weight replaced by the quantized
one, and the layer's outputs (computed with quantized weights) feed the next layer. Only the layer being
worked on sits on the work device.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import TalisError, UsageError

Progress = Callable[[int, int, str], None]  # (layers done, layers, message), called once per finished layer

METHODS = ("gptq", "rtn")
# Linears of one decoder layer in true-sequential order: each group sees the quantized outputs of the previous.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template*", "generation_config.json")
MIN_CALIB_TOKENS = 64
CALIB_SEED = 0
DAMP_PERCENT = 0.01
FORWARD_BATCH = 8  # calibration samples per layer forward


def quantize_model(model_dir: Path, out_dir: Path, bits: int = 4, group_size: int = 128, act_order: bool = False,
                   method: str = "gptq", calib_file: Path | None = None, sym: bool = True,
                   true_sequential: bool = True, nsamples: int = 128, seqlen: int = 2048,
                   damp_percent: float = DAMP_PERCENT, device: str | None = None,
                   progress: Progress | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Quantize the fp16/bf16/fp32 model in `model_dir` and write a GPTQ model folder to `out_dir`.

    method "gptq" needs `calib_file` (plain text); "rtn" (round-to-nearest) needs none. The tokenizer (for the
    calibration text, and copied to `out_dir`) is `tokenizer_dir`'s when given, else `model_dir`'s. Returns out_dir.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_settings(bits, group_size, method, nsamples, seqlen, damp_percent)
    _check_out_dir(model_dir, out_dir)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise UsageError(f"tokenizer folder {tokenizer_dir} does not exist: check --tokenizer")
    if method == "gptq" and calib_file is None:
        raise UsageError("GPTQ needs calibration text: pass --calib FILE (plain text in the model's domain), "
                         "or use --method rtn")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model, args = _load_fp_model(model_dir, dtype)

    if method == "gptq":
        from .tokenizer import load_tokenizer

        tokens = calibration_tokens(load_tokenizer(tokenizer_dir or model_dir), Path(calib_file), nsamples,
                                    min(seqlen, args.max_position_embeddings))
        packed = _gptq_layers(model, tokens, bits, group_size, sym, act_order, true_sequential, damp_percent,
                              device, progress)
    else:
        packed = rtn_layers(model, bits, group_size, sym, progress)

    settings = dict(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, true_sequential=true_sequential,
                    damp_percent=damp_percent, static_groups=False, checkpoint_format="gptq",
                    model_file_base_name="model", quant_method="gptq")
    _write_output(model, packed, model_dir, out_dir, settings, Path(tokenizer_dir or model_dir))
    return out_dir


def _check_settings(bits, group_size, method, nsamples, seqlen, damp_percent) -> None:
    from quant_kernels.gptq_format import SUPPORTED_BITS, valid_group_size

    if bits not in SUPPORTED_BITS:
        raise UsageError(f"--bits {bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if not valid_group_size(group_size):
        raise UsageError(f"--group-size {group_size} must be a power of two (e.g. 128) or -1 for one group per column")
    if method not in METHODS:
        raise UsageError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"need at least 1 calibration sample of 2 tokens (got {nsamples} x {seqlen})")
    if not 0 < damp_percent < 1:
        raise UsageError(f"damp_percent {damp_percent} must lie between 0 and 1 (0.01 is usual)")


def _check_out_dir(model_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise UsageError(f"{out_dir}: the output folder must differ from the model folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TalisError(f"{out_dir}: the output folder exists and is not empty; choose a new folder or empty it")


def _load_fp_model(model_dir: Path, dtype):
    """The unquantized model on the CPU (layers visit the work device one at a time)."""
    from .loaders import LoadRequest, pick_loader
    from .placement import DevicePlan

    loader = pick_loader(LoadRequest(model_dir=model_dir, plan=DevicePlan({"": "cpu"}), dtype=dtype))
    loaded = loader.load()
    if loaded.quant is not None:
        raise TalisError(f"{model_dir}: the model is already quantized ({loaded.quant.bits}-bit); "
                         "quantize the fp16 original instead")
    return loaded.model, loaded.args


def calibration_tokens(tokenizer, calib_file: Path, nsamples: int, seqlen: int) -> torch.Tensor:
    """`nsamples` random windows of the tokenized file, each `seqlen` long and starting with BOS (as prompts do).

    Returns int64 [nsamples, seqlen']; seqlen' is shorter when the file is.
    """
    try:
        text = calib_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TalisError(f"{calib_file}: cannot read the calibration text ({e.__class__.__name__}); "
                         "pass a UTF-8 text file") from None
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.int64)
    if ids.numel() < MIN_CALIB_TOKENS:
        raise TalisError(f"{calib_file}: only {ids.numel()} tokens of calibration text; "
                         f"GPTQ needs at least {MIN_CALIB_TOKENS} (a few thousand are better)")
    bos = tokenizer.bos_token_id
    body = min(seqlen - (bos is not None), ids.numel())
    generator = torch.Generator().manual_seed(CALIB_SEED)
    starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=generator)
    windows = torch.stack([ids[s:s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows


def _gptq_layers(model, tokens, bits, group_size, sym, act_order, true_sequential, damp_percent, device,
                 progress) -> dict:
    """GPTQ every decoder linear; returns {linear name: PackedWeight} (on the CPU)."""
    from quant_kernels.gptq import GPTQ

    from .model import attention_mask

    dtype = model.model.embed_tokens.weight.dtype
    with torch.no_grad():
        hidden = model.model.embed_tokens(tokens).to(device)  # (nsamples, T, dim)
        positions = torch.arange(tokens.shape[1], device=device)[None]
        cos, sin = model.rotary(positions, dtype)  # (1, 1, T, head_dim)
        window = model.args.sliding_window  # a window shorter than the samples needs a mask; else plain causal
        mask = attention_mask(positions[0], positions[0], None, window) if window and window < tokens.shape[1] else None
    groups = SEQUENTIAL_GROUPS if true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
    layers = model.model.layers
    packed = {}
    for index, layer in enumerate(layers):
        layer.to(device)
        for names in groups:
            solvers = {name: GPTQ(layer.get_submodule(name).weight.data) for name in names}
            hooks = [layer.get_submodule(name).register_forward_hook(_feeder(solver))
                     for name, solver in solvers.items()]
            _run_layer(layer, hidden, cos, sin, mask)  # only to capture the inputs
            for hook in hooks:
                hook.remove()
            for name, solver in solvers.items():
                linear = layer.get_submodule(name)
                full_name = f"model.layers.{index}.{name}"
                result = _solve(solver, full_name, bits, group_size, sym, act_order, damp_percent)
                linear.weight.data = result.dequantize().to(device, dtype)
                packed[full_name] = replace(result, **{k: v.cpu() for k, v in result.tensors().items()})
        hidden = _run_layer(layer, hidden, cos, sin, mask)  # outputs of the quantized layer feed the next one
        layer.to("cpu")
        if progress:  # once per layer, as rtn_layers: a log gets one line per layer
            progress(index + 1, len(layers), f"layer {index + 1}/{len(layers)}")
    return packed


def _feeder(solver):
    def hook(module, inputs, output):
        solver.add_batch(inputs[0].detach())
    return hook


def _run_layer(layer, hidden: torch.Tensor, cos, sin, mask=None) -> torch.Tensor:
    """hidden (nsamples, T, dim) through one decoder layer, a few samples at a time (mask: model.attention_mask's,
    None for plain causal attention)."""
    with torch.no_grad():
        return torch.cat([layer(chunk, cos, sin, 0, mask) for chunk in hidden.split(FORWARD_BATCH)])


def _solve(solver, name, bits, group_size, sym, act_order, damp_percent):
    try:
        return solver.quantize(bits, group_size, sym=sym, act_order=act_order, damp_percent=damp_percent)
    except torch.linalg.LinAlgError:
        raise TalisError(f"{name}: the calibration Hessian is not positive definite; use more or more varied "
                         "calibration text, or a larger damp_percent") from None


def rtn_layers(model, bits: int, group_size: int, sym: bool = True, progress: Progress | None = None) -> dict:
    """Round-to-nearest for every decoder linear; returns {linear name: PackedWeight}."""
    from quant_kernels.gptq import rtn_quantize

    layers = model.model.layers
    packed = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                packed[f"model.layers.{index}.{name}"] = rtn_quantize(module.weight.data.float(), bits, group_size, sym)
        if progress:
            progress(index + 1, len(layers), f"layer {index + 1}/{len(layers)}")
    return packed


def _give_normal_mode(path: Path) -> None:
    """The mode a newly created file gets from the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_output(model, packed: dict, model_dir: Path, out_dir: Path, settings: dict, tokenizer_dir: Path) -> None:
    """model.safetensors (AutoGPTQ names, fp16 for what stays unquantized), quantize_config.json, config.json
    with `quantization_config`, and the tokenizer files."""
    from safetensors.torch import save_file

    tensors = {}
    for name, result in packed.items():
        for key, value in result.tensors().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    tied = model.args.tie_word_embeddings
    for name, value in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in packed and name.endswith(".weight"):
            continue
        if tied and name == "lm_head.weight":
            continue  # the embeddings are the output layer
        tensors[name] = value.to("cpu", torch.float16).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _give_normal_mode(out_dir / "model.safetensors")  # safetensors creates it owner-only (0600)
    (out_dir / "quantize_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = settings
    config["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for pattern in TOKENIZER_PATTERNS:
        folder = model_dir if pattern == "generation_config.json" else tokenizer_dir
        for path in folder.glob(pattern):
            if path.is_file():
                shutil.copy(path, out_dir / path.name)
