"""Engine: from load settings to a model, its tokenizer and a generator — what the CLI calls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .tokenizer import PromptEncoder, adds_bos, check_in_embedding, load_tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MAX_SEQ_LEN = 2048
BACKENDS = ("auto", "torch", "torch_dense", "triton")
# On CPU, dequantizing once into float weights beats re-dequantizing every step; only for models this small.
DENSE_CPU_LIMIT = 2_000_000_000  # bytes of float weights


@dataclass
class LoadSettings:
    model_dir: Path | str | None = None  # None: the embedded default model
    checkpoint: Path | str | None = None  # weights file apart from the model folder
    wbits: int | None = None  # GPTQ: must match the checkpoint; fp16 weights: round-to-nearest quantize on load
    groupsize: int | None = None
    device_map: str | Path | None = "auto"  # a packaged name or a JSON file
    max_memory: str | None = None  # caps for planning, like "0=22GiB,1=24GiB,cpu=32GiB"
    max_seq_len: int | None = None  # context size of the KV cache; default min(model's, 2048)
    kv_cache: str = "fp16"  # KV cache type: fp16 (the model's float dtype), int8 or fp8 (kv_cache.py)
    allow_pickle: bool = False  # .bin/.pt checkpoints (no code runs: tensors only)
    backend: str = "auto"  # QuantLinear backend: auto, torch, torch_dense, triton
    loader: str | None = None  # force a registered loader by name
    threads: int | None = None  # torch CPU threads; None: talis_cli.threads.default_threads()
    reserve_cores: int = 0  # cores that default leaves free (talis serve: for its HTTP side and local clients)
    tokenizer: Path | str | None = None  # folder of the tokenizer files; None: the model folder
    tensor_parallel: int | None = None  # ranks holding 1/N of every layer each; None: the device map's, else 1
    shard: object = None  # set by talis_cli.tensor_parallel on each rank: its tensor_parallel.shard.Shard


class LoadPhases:
    """Seconds of each phase of a model load, in the order they ran (`time.perf_counter` laps).

    phases: {name: seconds}; total: seconds from the start to the last lap (the phases sum to it).
    """

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Close phase `name` now: the time since the previous lap (or the start) is its."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self._start


class Engine:
    def __init__(self, loaded, tokenizer, plan, max_seq_len: int, model_dir: Path, load_s: float, backend: str,
                 generation_defaults: dict | None = None):
        from .generation import Generator
        from .rope import trained_context

        self.model = loaded.model
        self.args = loaded.args
        self.quant = loaded.quant
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer)
        self.plan = plan
        self.max_seq_len = max_seq_len
        self.model_dir = model_dir
        self.load_s = load_s  # seconds; Engine.load sets it to load_phases.total
        self.load_phases: LoadPhases | None = None  # set by Engine.load
        self.backend = backend
        self.tensor_parallel = 1  # ranks holding a part of every layer (talis_cli.tensor_parallel sets it)
        self.add_bos = adds_bos(tokenizer)  # prompts start with BOS where the tokenizer's own encode adds it
        self.generation_defaults = generation_defaults or {}  # the folder's generation_config.json
        self.eos_ids = eos_ids(loaded.args, tokenizer, self.generation_defaults)
        self.context_limit = trained_context(loaded.args)  # the most --max-seq-len may allocate
        self.generator = Generator(self.model, tokenizer, self.eos_ids, max_seq_len, self.context_limit)

    @classmethod
    def load(cls, settings: LoadSettings | None = None, progress=None) -> "Engine":
        """Load the model and tokenizer `settings` name; the engine's `load_phases` says where the time went."""
        phases = LoadPhases()
        from .loaders import LoadRequest, pick_loader
        from .loaders.base import read_model_args
        from .model_generation_config import read_generation_config
        from .memory_plan import footprint, parse_max_memory
        from .kv_cache import check_devices, check_kind
        from .model_info import kv_cache_bytes
        from .placement import DevicePlan, load_device_map, map_may_use_gpu, plan_devices

        from .threads import set_threads

        phases.lap("imports")  # torch, on a CPU the larger part of a small model's load
        settings = settings or LoadSettings()
        set_threads(settings.threads, settings.reserve_cores)
        model_dir = Path(settings.model_dir) if settings.model_dir else DEFAULT_MODEL_DIR
        if settings.backend not in BACKENDS:
            raise UsageError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}")
        check_kind(settings.kv_cache)
        label, raw_map = load_device_map(settings.device_map)
        if settings.shard is None:
            from .tensor_parallel import load_engine, requested_size

            size = requested_size(settings.tensor_parallel, raw_map, f"device map {label}")
            if size > 1:  # start the ranks; each comes back here with its shard
                if map_may_use_gpu(raw_map):  # what each rank's GPU would refuse, refused before any rank starts
                    check_devices(settings.kv_cache, [f"cuda:{rank}" for rank in range(size)])
                return load_engine(cls, settings, raw_map, size, progress)
        request = LoadRequest(model_dir, None, Path(settings.checkpoint) if settings.checkpoint else None,
                              settings.wbits, settings.groupsize, settings.allow_pickle)
        loader = pick_loader(request, settings.loader)
        args = read_model_args(model_dir)
        generation_defaults = read_generation_config(model_dir)  # before the weights: a broken file fails fast
        max_seq_len = check_max_seq_len(settings.max_seq_len, args)
        max_memory = parse_max_memory(settings.max_memory) if settings.max_memory else None
        float_bytes = 2 if map_may_use_gpu(raw_map) else 4  # fp16 on GPUs, fp32 on the CPU
        if settings.shard is not None:  # a tensor-parallel rank: all of its part on its own device
            request.plan, request.shard = DevicePlan({"": settings.shard.device}), settings.shard
        else:
            fp = footprint(loader.tensor_shapes(), args.n_layers,
                           kv_cache_bytes(args, max_seq_len, dtype_bytes=float_bytes, kind=settings.kv_cache)
                           // args.n_layers, float_bytes)
            request.plan = plan_devices(raw_map, args.n_layers, f"device map {label}", fp, max_memory)
        check_devices(settings.kv_cache, request.plan.devices)
        phases.lap("config and plan")
        # before the weights: a folder without a usable tokenizer fails fast
        tokenizer = load_tokenizer(settings.tokenizer or model_dir)
        phases.lap("tokenizer")
        loaded = loader.load(progress)
        if settings.shard is not None:
            settings.shard.wrap(loaded.model)  # o_proj, down_proj: sums over the ranks
        phases.lap("weights read")
        if request.plan.uses_cuda:  # fused q/k/v and gate/up: one launch each at decode
            from quant_kernels.fuse import fuse_model

            fuse_model(loaded.model)
        backend = choose_backend(settings.backend, loaded.model, request.plan)
        phases.lap("backend prepare")
        loaded.model.kv_cache_kind = settings.kv_cache  # every later setup_cache (scheduler, perplexity) keeps it
        loaded.model.setup_cache(1, max_seq_len)
        engine = cls(loaded, tokenizer, request.plan, max_seq_len, model_dir, 0.0, backend, generation_defaults)
        phases.lap("KV cache")
        graphs = settings.shard is None or settings.shard.graphs  # tensor parallel: where the all-reduce captures
        if request.plan.uses_cuda and _triton_backend_available() and graphs:  # the CUDA-graph decode step
            from .fast_decode import accelerate

            # tensor parallel: no prefill graphs yet (their larger all-reduces inside a graph are untested)
            accelerate(engine.model, engine.generator, prefill_graphs=settings.shard is None)
            phases.lap("CUDA graphs")
        engine.load_phases, engine.load_s = phases, phases.total
        return engine

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text` as plain text (`special`: control-token text such as ``</s>`` becomes control
        tokens), after the model's BOS when `add_bos` (not twice when the parsed text starts with it).
        TalisError when an id falls outside the embedding."""
        ids = self.encoder.parse_special(text) if special else self.encoder.plain(text)
        bos = self.bos_id
        if add_bos and self.add_bos and bos is not None and not (ids[:1] == [bos] and special):
            ids = [bos] + ids
        return self.checked(ids)

    def encode_chat(self, render, messages: list) -> list[int]:
        """Token ids of `messages` rendered by `render` (messages -> text holding its own BOS): only the
        renderer's markup yields control tokens (PromptEncoder.encode_chat). TalisError as for encode."""
        return self.checked(self.encoder.encode_chat(render, messages))

    def checked(self, ids: list[int]) -> list[int]:
        """`ids`, after checking that the embedding holds each (TalisError naming the token otherwise)."""
        check_in_embedding(ids, self.args.vocab_size, self.tokenizer)
        return ids

    @property
    def bos_id(self) -> int | None:
        """The model's beginning-of-sequence id (config.json's, else the tokenizer's), or None."""
        return self.args.bos_token_id if self.args.bos_token_id is not None else self.tokenizer.bos_token_id

    @property
    def info(self) -> dict:
        """Facts for `talis info` and the REPL's /info."""
        from .model_info import describe

        return describe(self)


def eos_ids(args, tokenizer, generation_defaults: dict | None = None) -> list[int]:
    """Token ids that end a reply: the union of config.json's, generation_config.json's (`generation_defaults`,
    parsed) and the tokenizer's EOS ids, plus the chat turn ends the vocabulary has."""
    from .model_generation_config import eos_token_ids

    ids = list(args.eos_token_ids)
    ids += [i for i in eos_token_ids(generation_defaults or {}) if i not in ids]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):  # chat turn ends of LLaMA 3 and ChatML
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids


def check_max_seq_len(requested: int | None, args) -> int:
    from .rope import trained_context

    limit = trained_context(args)
    if requested is None:
        return min(limit, DEFAULT_MAX_SEQ_LEN)
    if requested < 2:
        raise UsageError(f"--max-seq-len {requested} is too small; it must be at least 2")
    if requested > limit:
        raise UsageError(f"--max-seq-len {requested} exceeds what the model was trained for ({limit}); use at most {limit}")
    return requested


def choose_backend(requested: str, model, plan) -> str:
    """Pick the QuantLinear backend and switch every quantized layer to it."""
    from quant_kernels.quant_linear import QuantLinear, available_backends

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    name = requested
    if requested == "auto":
        if plan.uses_cuda:
            name = "triton" if _triton_backend_available() else "torch"
        else:
            float_bytes = sum(m.in_features * m.out_features * 4 for m in layers)
            name = "torch_dense" if float_bytes <= DENSE_CPU_LIMIT else "torch"
    elif requested == "triton" and not (plan.uses_cuda and _triton_backend_available()):
        raise UsageError("--backend triton needs a CUDA GPU and the triton package (pip install triton); "
                         "use --backend torch on this machine")
    if name not in available_backends():
        raise UsageError(f"backend {name!r} is not available here; available: {', '.join(available_backends())}")
    for m in layers:
        m.set_backend(name, keep_source=False)  # a backend with its own copy of the weight frees the GPTQ one
    return name


def _triton_backend_available() -> bool:
    try:
        import quant_kernels.triton_backend  # noqa: F401  (registers "triton")
    except Exception:
        return False
    return True
