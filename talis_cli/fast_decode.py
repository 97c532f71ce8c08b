"""The fast decode step: fused Triton ops over static buffers, replayed as one CUDA graph per context bucket.

`DecodeStep` computes the same function as `Transformer.forward(tokens[B, 1], start_pos=pos, pad_lens)` on a
model with a static KV cache, but reads the token, the slot and the padding from device buffers, so its kernel
launches never change and a CUDA graph can capture them. Attention runs over the first `capacity` slots only,
so graphs are captured per context-length bucket (powers of two up to the cache length): short contexts do not
pay for launching over the whole cache.

`CudaGraphDecoder` is the runner the Generator calls in place of its plain decode step; `accelerate(model,
generator)` fuses q/k/v and gate/up and plugs the runner in when the whole model sits on one CUDA device.
"""
from __future__ import annotations

import torch

from quant_kernels import triton_ops as ops
from quant_kernels.fuse import fuse_model
from quant_kernels.triton_backend import forward_gathered, input_gather, input_scatter

MIN_BUCKET = 128  # smallest attention capacity captured


class DecodeStep:
    """One decode step of `model` (talis_cli.model.Transformer with a cache) for `batch` rows.

    Static inputs: `tokens` int64 [batch], `slot` int64 [1] (the cache slot being written), `pad_lens` int64
    [batch]. `run(capacity)` returns float32 logits [batch, vocab]; capacity >= slot + 1.
    """

    def __init__(self, model, batch: int):
        self.model = model
        device = model.model.embed_tokens.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pad_lens = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.arange(model.max_seq_len, device=device)[None]
        cos, sin = model.rotary(positions, dtype)  # [1, 1, S, hd]: the eager model's own tables
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        self.n_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        # where attention writes each feature for an act-order o_proj (None: in order)
        self.o_scatter = [input_scatter(layer.self_attn.o_proj) for layer in model.model.layers]

    @staticmethod
    def _norm_qkv(x, residual, layer):
        """q, k, v of `layer` from its input norm of x (+ residual). An act-order q/k/v GEMV on the Triton kernels
        gets its input from the norm already in the order it reads (triton_backend.input_gather)."""
        attn, norm = layer.self_attn, layer.input_layernorm
        gather = input_gather(attn.qkv_proj)
        h = ops.rms_norm(x, norm.weight, norm.eps, residual, gather=gather)
        return attn.project_qkv(h) if gather is None else attn.split_qkv(forward_gathered(attn.qkv_proj, h))

    def run(self, capacity: int) -> torch.Tensor:
        layers = self.model.model.layers
        x = self.model.model.embed_tokens(self.tokens)  # [B, dim]
        residual = x.clone()  # the residual stream, updated in place by each fused add + norm
        q, k, v = self._norm_qkv(x, None, layers[0])
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            cache = attn.kv_cache
            scatter = self.o_scatter[i]
            y = ops.decode_attention(q, k, v, self.cos, self.sin, self.slot, self.pad_lens, cache.k, cache.v,
                                     capacity, self.n_sms, scatter=scatter)  # [B, heads*hd]
            o = attn.o_proj(y) if scatter is None else forward_gathered(attn.o_proj, y)
            norm = layer.post_attention_layernorm
            gather = input_gather(mlp.gate_up_proj)
            h = ops.rms_norm(o, norm.weight, norm.eps, residual, gather=gather)
            gate, up = mlp.project_gate_up(h) if gather is None else forward_gathered(mlp.gate_up_proj, h).chunk(2, -1)
            gather = input_gather(mlp.down_proj)
            act = ops.silu_mul(gate, up, gather=gather)
            out = mlp.down_proj(act) if gather is None else forward_gathered(mlp.down_proj, act)
            if i + 1 < len(layers):
                q, k, v = self._norm_qkv(out, residual, layers[i + 1])
        norm = self.model.model.norm
        h = ops.rms_norm(out, norm.weight, norm.eps, residual)
        return self.model.lm_head(h).float()


def buckets(max_seq_len: int) -> list[int]:
    """Attention capacities captured: powers of two from MIN_BUCKET, the last one the whole cache."""
    sizes, size = [], MIN_BUCKET
    while size < max_seq_len:
        sizes.append(size)
        size *= 2
    return sizes + [max_seq_len]


class CudaGraphDecoder:
    """Replays a captured `DecodeStep` per (batch, bucket); `__call__` matches `Generator._decode_step`.

    Graphs are captured lazily on first use of a bucket (after one eager run, which also picks kernel configs)
    and share one memory pool. A new KV cache (setup_cache) drops them. The returned logits are a static buffer,
    valid until the next call.
    """

    def __init__(self, model):
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self._steps: dict[int, DecodeStep] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._cache_version = None
        self._buckets: list[int] = []

    def __call__(self, tokens: torch.Tensor, pos: int, pad_lens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens int64 [B, 1] at cache slot `pos` (pad_lens int64 [B] or None) -> float32 logits [B, vocab]."""
        if self.model.cache_version != self._cache_version:  # a new cache: captured pointers are stale
            self._steps.clear()
            self._graphs.clear()
            self._cache_version = self.model.cache_version
            self._buckets = buckets(self.model.max_seq_len)
        B = tokens.shape[0]
        step = self._steps.get(B)
        if step is None:
            step = self._steps[B] = DecodeStep(self.model, B)
        step.tokens.copy_(tokens[:, 0])
        step.slot.fill_(pos)
        if pad_lens is None:
            step.pad_lens.zero_()
        else:
            step.pad_lens.copy_(pad_lens)
        capacity = next(b for b in self._buckets if b > pos)
        captured = self._graphs.get((B, capacity))
        if captured is None:
            captured = self._graphs[(B, capacity)] = self._capture(step, capacity)
        graph, logits = captured
        graph.replay()
        return logits

    def capture_all(self, batch: int = 1) -> None:
        """Capture every bucket now (at load), so no reply stalls when its context crosses into a new bucket.
        The steps write cache slots that a generation always writes again before reading them."""
        device = self.model.model.embed_tokens.weight.device
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.inference_mode():
            for capacity in buckets(self.model.max_seq_len):
                self(tokens, capacity - 1)

    def _capture(self, step: DecodeStep, capacity: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The eager run writes the same cache slot the replay will write, so it changes nothing; it tunes kernels
        # and warms the allocator outside the capture, on a side stream as capture requires.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step.run(capacity)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step.run(capacity)
        return graph, logits


def single_cuda_device(model) -> torch.device | None:
    """The CUDA device holding every parameter and buffer of `model`, or None (CPU, or split across devices)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) == 1:
        device = devices.pop()
        return device if device.type == "cuda" else None
    return None


def accelerate(model, generator=None) -> CudaGraphDecoder | None:
    """Fuse q/k/v and gate/up, then (model wholly on one CUDA device) give `generator` the CUDA-graph decode step.

    Returns the runner, or None where the model stays on the plain path.
    """
    fuse_model(model)
    if single_cuda_device(model) is None:
        return None
    runner = CudaGraphDecoder(model)
    runner.capture_all(model.cache_batch)
    if generator is not None:
        generator.fast_decode = runner
    return runner
