"""What `talis info` reports: architecture, quantization, sizes and the memory a context needs."""

from __future__ import annotations

import dataclasses


def parameter_count(args, tied_head: bool | None = None) -> int:
    """Parameters of the model as trained (quantized linears counted as their float weights). tied_head: whether
    lm_head shares the embedding's weights (default: as config.json says; a quantized head never does)."""
    tied = args.tie_word_embeddings if tied_head is None else tied_head
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    mlp = 3 * args.dim * args.intermediate_size
    norms = 2 * args.dim
    embed = args.vocab_size * args.dim * (1 if tied else 2)
    return args.n_layers * (attn + mlp + norms) + embed + args.dim


def kv_cache_bytes(args, context: int, batch: int = 1, dtype_bytes: int = 2, kind: str = "fp16") -> int:
    """Bytes of a KV cache of `context` slots for `batch` rows over every layer: of type `kind` ("fp16": floats of
    `dtype_bytes`; "int8", "fp8": 8-bit codes and one fp32 scale per head vector, talis_cli.kv_cache.slot_bytes)."""
    from .kv_cache import slot_bytes

    return args.n_layers * slot_bytes(args.n_kv_heads, args.head_dim, kind, dtype_bytes) * context * batch


KV_BUFFERS = (".k", ".v", ".k_scale", ".v_scale")  # the KV cache's buffers (kv_cache.KVCache)


def weight_bytes_in_memory(model) -> int:
    """Bytes of the weights as loaded: parameters, buffers (not the KV cache) and what quantized layers' backends
    hold beside them (the Triton backend's repacked words, which replace the GPTQ tensors; a dense copy)."""
    return sum(weight_bytes_by_device(model).values())


def weight_bytes_by_device(model) -> dict[str, int]:
    """weight_bytes_in_memory per device ("cpu", "cuda:0", ...), each tensor counted once."""
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith(KV_BUFFERS)]
    for module in model.modules():
        tensors += _tensors_in(getattr(module, "backend_state", None))
    seen, totals = set(), {}
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            totals[str(t.device)] = totals.get(str(t.device), 0) + t.numel() * t.element_size()
    return totals


def memory_by_device(model) -> dict[str, dict]:
    """{device: {"weights_bytes", "kv_cache_bytes"}}: where a model's weights and its allocated KV cache sit."""
    out = {device: {"weights_bytes": size, "kv_cache_bytes": 0} for device, size in weight_bytes_by_device(model).items()}
    for name, buffer in model.named_buffers():
        if name.endswith(KV_BUFFERS):
            entry = out.setdefault(str(buffer.device), {"weights_bytes": 0, "kv_cache_bytes": 0})
            entry["kv_cache_bytes"] += buffer.numel() * buffer.element_size()
    return out


def _tensors_in(state) -> list:
    """The tensors a backend state holds: itself, or inside its dataclass fields, dict values or sequence items."""
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    elif isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors_in(item)]
    return []


def head_kind(model) -> str:
    """How lm_head holds its weights: "quantized" (GPTQ tensors), "tied" (the embedding's) or "float" (its own)."""
    head = model.lm_head
    if not hasattr(head, "weight"):
        return "quantized"
    return "tied" if head.weight is model.model.embed_tokens.weight else "float"


def describe(engine) -> dict:
    from .model_generation_config import suggested_sampling

    args, quant = engine.args, engine.quant
    weights = weight_bytes_in_memory(engine.model)
    kind = engine.model.kv_cache_kind
    kv = kv_cache_bytes(args, engine.max_seq_len, dtype_bytes=engine.model.dtype.itemsize, kind=kind)
    head = head_kind(engine.model)
    info = {
        "model": str(engine.model_dir),
        "loader": engine.loaded.loader,
        "files": [str(f) for f in engine.loaded.files],
        "bytes_on_disk": sum(f.stat().st_size for f in engine.loaded.files),
        "architecture": {
            "layers": args.n_layers, "hidden": args.dim, "intermediate": args.intermediate_size,
            "heads": args.n_heads, "kv_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab": args.vocab_size,
            "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
            "max_position_embeddings": args.max_position_embeddings, "tied_embeddings": head == "tied",
            "sliding_window": args.sliding_window,
        },
        "parameters": parameter_count(args, tied_head=head == "tied"),
        "quantization": None if quant is None else {
            "bits": quant.bits, "group_size": quant.group_size, "act_order": quant.desc_act, "sym": quant.sym,
            "format": quant.checkpoint_format, "lm_head": head == "quantized",
        },
        "eos_token_ids": list(engine.eos_ids),  # every id that ends a reply (config, generation config, tokenizer)
        "backend": engine.backend,
        "context": engine.max_seq_len,
        "kv_cache": kind,  # "fp16" (the model dtype), "int8" or "fp8"
        "memory": {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv},
        "device_plan": _summarize_plan(engine.plan, args.n_layers),
    }
    by_device = memory_by_device(engine.model)
    if len(by_device) > 1:  # a model split over devices: what each holds
        info["memory"]["by_device"] = by_device
    sampling = suggested_sampling(getattr(engine, "generation_defaults", {}))
    if sampling:  # generation_config.json's values, HF names; `--preset model` uses them
        info["suggested_sampling"] = sampling
    return info


def _summarize_plan(plan, n_layers: int) -> dict:
    """Device -> which parts live there, with layer ranges folded ("layers 0-15")."""
    out: dict[str, list[str]] = {}
    run_dev, run_start = None, 0
    for i in range(n_layers + 1):
        dev = plan.device_for(f"model.layers.{i}") if i < n_layers else None
        if dev != run_dev:
            if run_dev is not None:
                out.setdefault(run_dev, []).append(f"layers {run_start}-{i - 1}")
            run_dev, run_start = dev, i
    for part in ("model.embed_tokens", "model.norm", "lm_head"):
        out.setdefault(plan.device_for(part), []).append(part.split(".")[-1])
    return out
