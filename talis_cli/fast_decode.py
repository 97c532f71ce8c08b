"""The fast decode step: fused Triton ops over static buffers, replayed as one CUDA graph per context bucket.

`DecodeStep` computes the same function as `Transformer.forward(tokens[B, 1], start_pos=pos, pad_lens)` on a
model with a static KV cache, but reads the token, the slot and the padding from device buffers, so its kernel
launches never change and a CUDA graph can capture them. Attention runs over the first `capacity` slots only,
so graphs are captured per context-length bucket (powers of two up to the cache length, or up to the sliding
window, whose slots are all a step reads): short contexts do not pay for launching over the whole cache.

A step is either the left-padded batch of the Generator (one shared slot) or rows at their own positions (the
scheduler's continuous batching: each row its own slot and its own cache row), captured per batch-size bucket
(1, 2, 4, 8, ...): lanes beyond the real rows write into the cache's spare last row, which no request owns.

`CudaGraphDecoder` is the runner the Generator calls in place of its plain decode step (and the scheduler through
`decode_rows`); `accelerate(model, generator)` fuses q/k/v and gate/up and plugs the runner in when the model sits
on CUDA devices (a model split over several GPUs: one graph per device, `graph_devices`).

Graphs are captured lazily. The load captures only the first context bucket (whose eager run compiles the kernels
and tunes the GEMVs, which every later bucket shares) and runs a later bucket once eagerly where its attention
launch compiles apart (`attention_variant`); a bucket is captured on first use, and the next larger one ahead of
need, once a sequence that may reach it (`CudaGraphDecoder.expect`) passes AHEAD_FRACTION of its bucket.
A server captures every batch and context bucket at its start instead (`capture_rows`, Scheduler.warm_up).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from quant_kernels import triton_ops as ops
from quant_kernels.fuse import fuse_model
from quant_kernels.triton_backend import forward_gathered, input_gather, input_scatter

from . import rope
from .capture_stream import capture_stream
from .fast_prefill import prefill_runner

MIN_BUCKET = 128  # smallest attention capacity captured
AHEAD_FRACTION = 0.5  # a step past this share of its bucket captures the next bucket (when the sequence may need it)


class DecodeStep:
    """One decode step of `model` (talis_cli.model.Transformer with a cache) for `batch` rows, over the decoder
    layers `layers` (default: all), which must sit on one device.

    Static inputs: `tokens` int64 [batch] (read by the step over the first layers only), `slot` int64 [1] (the cache
    slot being written), `pad_lens` int64 [batch]. With `per_row`, `inputs` int64 [3, batch] holds the tokens, each
    row's own slot and its cache row (`tokens`, `slot`, `rows` are its rows; pad_lens stay 0). A step that does
    not start at layer 0 reads `x_in` and `res_in` ([batch, dim] in the model dtype: the hidden state and residual
    stream after the layers before it, filled by `feed`). `run(capacity)` returns float32 logits [batch, vocab] when it ends with the last layer,
    else the (hidden state, residual stream) for the next step; capacity >= slot + 1.
    A model split over GPUs runs one step per device, chained (`segments`); only the hidden state and the
    residual stream cross from one device to the next.
    """

    def __init__(self, model, batch: int, layers: range | None = None, per_row: bool = False):
        self.model = model
        self.layers = layers if layers is not None else range(len(model.model.layers))
        first_layer = model.model.layers[self.layers.start]
        self.device = device = first_layer.input_layernorm.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        self.first = self.layers.start == 0
        self.last = self.layers.stop == len(model.model.layers)
        self.per_row = per_row
        if per_row:
            self.inputs = torch.zeros(3, batch, dtype=torch.long, device=device)  # one copy fills them all
            self.tokens, self.slot, self.rows = self.inputs
        else:
            self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
            self.slot = torch.zeros(1, dtype=torch.long, device=device)
            self.rows = None
        self.pad_lens = torch.zeros(batch, dtype=torch.long, device=device)
        if not self.first:
            self.x_in = torch.zeros(batch, model.args.dim, dtype=dtype, device=device)
            self.res_in = torch.zeros_like(self.x_in)
        positions = torch.arange(model.max_seq_len, device=device)[None]
        cos, sin = model.rotary(positions, dtype)  # [1, 1, S, hd]: the eager model's own tables
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        # dynamic NTK: the step rewrites its rows' entries for this step's sequence length (`_update_rotary`)
        self.dynamic_rope = rope.is_dynamic(model.args)
        self.window = sliding_window(model)
        self.n_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        # where attention writes each feature for an act-order o_proj (None: in order)
        self.o_scatter = [input_scatter(model.model.layers[i].self_attn.o_proj) for i in self.layers]

    def feed(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy the (hidden state, residual stream) a step over the layers before this one returned."""
        self.x_in.copy_(outputs[0])
        self.res_in.copy_(outputs[1])

    @staticmethod
    def _norm_qkv(x, residual, layer):
        """q, k, v of `layer` from its input norm of x (+ residual). An act-order q/k/v GEMV on the Triton kernels
        gets its input from the norm already in the order it reads (triton_backend.input_gather)."""
        attn, norm = layer.self_attn, layer.input_layernorm
        gather = input_gather(attn.qkv_proj)
        h = ops.rms_norm(x, norm.weight, norm.eps, residual, gather=gather)
        return attn.project_qkv(h) if gather is None else attn.split_qkv(forward_gathered(attn.qkv_proj, h))

    def _update_rotary(self) -> None:
        """Dynamic NTK: the frequencies of a step follow its longest row, so the table entries at this step's
        positions are rewritten (rows at one position share them; earlier entries are never read again)."""
        positions = (self.slot - self.pad_lens).clamp(min=0)  # [B], as the eager forward computes them
        if self.per_row:  # each row's frequencies follow its own length, as decode_rows computes them
            pairs = [self.model.rotary(positions[b : b + 1, None], self.cos.dtype) for b in range(len(positions))]
            cos, sin = torch.cat([c for c, _ in pairs]), torch.cat([s for _, s in pairs])
        else:
            cos, sin = self.model.rotary(positions[:, None], self.cos.dtype)  # [B, 1, 1, hd]
        self.cos[positions] = cos[:, 0, 0]
        self.sin[positions] = sin[:, 0, 0]

    def run(self, capacity: int):
        layers = [self.model.model.layers[i] for i in self.layers]
        if self.dynamic_rope:
            self._update_rotary()
        if self.first:
            x = self.model.model.embed_tokens(self.tokens)  # [B, dim]
            residual = x.clone()  # the residual stream, updated in place by each fused add + norm
            q, k, v = self._norm_qkv(x, None, layers[0])
        else:
            residual = self.res_in
            q, k, v = self._norm_qkv(self.x_in, residual, layers[0])
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            cache = attn.kv_cache
            scatter = self.o_scatter[i]
            y = ops.decode_attention(q, k, v, self.cos, self.sin, self.slot, self.pad_lens, cache.k, cache.v,
                                     capacity, self.n_sms, scatter=scatter, window=self.window,
                                     rows=self.rows, k_scale=cache.k_scale, v_scale=cache.v_scale)  # [B, heads*hd]
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
        if not self.last:
            return out, residual
        norm, head = self.model.model.norm, self.model.lm_head  # head: nn.Linear or a quantized QuantLinear
        gather = input_gather(head)
        h = ops.rms_norm(out, norm.weight, norm.eps, residual, gather=gather)
        return (head(h) if gather is None else forward_gathered(head, h)).float()


def segments(model, batch: int, bounds: list[int] | None = None, per_row: bool = False) -> list[DecodeStep]:
    """Decode steps over consecutive layer ranges, to run in turn: by default one per run of layers on one
    device; `bounds` (first layer of each range after the first) forces other cuts (tests); `per_row`: rows at
    their own positions (DecodeStep)."""
    layers = model.model.layers
    if bounds is None:
        devices = [layer.input_layernorm.weight.device for layer in layers]
        bounds = [i for i in range(1, len(layers)) if devices[i] != devices[i - 1]]
    edges = [0, *bounds, len(layers)]
    return [DecodeStep(model, batch, range(a, b), per_row) for a, b in zip(edges, edges[1:])]


def lanes_for(rows: int) -> int:
    """The batch-size bucket (a power of two) whose graph runs `rows` rows at their own positions."""
    lanes = 1
    while lanes < rows:
        lanes *= 2
    return lanes


def sliding_window(model) -> int | None:
    """The model's sliding window when it is shorter than its cache (else every slot is in it: None)."""
    window = model.args.sliding_window
    return window if window is not None and window < model.max_seq_len else None


def buckets(max_seq_len: int, window: int | None = None) -> list[int]:
    """Attention capacities captured: powers of two from MIN_BUCKET, the last one the whole cache, or the sliding
    `window` when it is shorter (a step reads at most its slots, at any position)."""
    limit = min(max_seq_len, window) if window is not None else max_seq_len
    sizes, size = [], MIN_BUCKET
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def bucket(sizes: list[int], pos: int) -> int:
    """The capacity for a step writing slot `pos`: the smallest bucket above it, else (past a sliding window) the
    last one."""
    return next((size for size in sizes if size > pos), sizes[-1])


class CudaGraphDecoder:
    """Replays captured `DecodeStep`s per (batch, bucket); `__call__` matches `Generator._decode_step`.

    A model on one GPU is one step and one graph; a model split over GPUs is one step and one graph per device
    (`segments`), replayed in turn, the hidden state and residual stream copied from one device to the next
    between them (a copy between devices waits for the source's work and holds back the destination's).
    Graphs are captured lazily on first use of a bucket (after one eager run, which also picks kernel configs);
    the graphs of one device share a memory pool. A new KV cache (setup_cache) drops them. The returned logits are
    a static buffer on the last layer's device, valid until the next call.

    Ahead of need: once told the last slot a generation may write (`expect`), a step past AHEAD_FRACTION of its
    bucket also captures the next bucket, right after launching its own graph, so the capture's host work runs
    while the GPU computes that step. It runs on the calling thread, not on a background thread, because:
    - the capture's eager run executes the step: its split-K GEMVs share one partial-sum and ticket workspace per
      device (triton_gemv.Workspace) with the step in flight, and every graph of a batch size reads the same
      static input buffers (token, slot), so it must not overlap another step;
    - torch.cuda.graph captures in the "global" error mode: a cudaMalloc or synchronizing call from another
      thread (the caching allocator growing, a token copy) during a capture fails or invalidates it;
    - recording is Python launching a few hundred kernels under the GIL, which a thread would not overlap anyway.
    """

    def __init__(self, model):
        self.model = model
        self._pools: dict[torch.device, object] = {}  # device -> the memory pool of its graphs
        # batch key: B for a left-padded batch of B rows, ("rows", lanes) for rows at their own positions
        self._steps: dict[object, list[DecodeStep]] = {}  # batch key -> its steps
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}  # (batch key, capacity, index)
        self._cache_version = None
        self._buckets: list[int] = []
        self._reach: int | None = None  # the last slot the current generation may write (`expect`); None: unknown
        self.capture_s: list[float] = []  # host seconds of each capture so far (its eager run included), in order
        self.load_captures = 0  # how many of them capture_first made (the load's)

    @property
    def captured(self) -> int:
        """How many graphs are captured now (one per batch key, context bucket and device segment)."""
        return len(self._graphs)

    def later_captures(self) -> tuple[int, float]:
        """(captures, host seconds) since the load's: what replies paid for buckets captured on first use or
        ahead of need (`talis generate --stats` shows it)."""
        later = self.capture_s[self.load_captures:]
        return len(later), sum(later)

    def expect(self, last_slot: int) -> None:
        """The current generation writes no cache slot after `last_slot` (the prompt's length plus its token
        budget): a bucket it cannot reach is never captured ahead of need."""
        self._reach = last_slot

    def __call__(self, tokens: torch.Tensor, pos: int, pad_lens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens int64 [B, 1] at cache slot `pos` (pad_lens int64 [B] or None) -> float32 logits [B, vocab]."""
        self._check_cache()
        B = tokens.shape[0]
        steps = self._steps_for(B, B, False)
        steps[0].tokens.copy_(tokens[:, 0])
        capacity = bucket(self._buckets, pos)

        def fill(step):
            step.slot.fill_(pos)
            if pad_lens is None:
                step.pad_lens.zero_()
            else:
                step.pad_lens.copy_(pad_lens)
        logits = self._replay(steps, B, capacity, fill)
        ahead = self.ahead_bucket(pos)
        if ahead is not None and not self._has(B, ahead, len(steps)):
            self._capture_ahead(steps, B, ahead)
        return logits

    def ahead_bucket(self, pos: int) -> int | None:
        """The bucket to capture ahead of need after a step at slot `pos`: the next one above pos's bucket once
        pos has passed AHEAD_FRACTION of its bucket and the generation may reach it (`expect`); else None."""
        capacity = bucket(self._buckets, pos)
        larger = [size for size in self._buckets if size > capacity]
        if not larger or self._reach is None or self._reach < capacity or pos + 1 < AHEAD_FRACTION * capacity:
            return None
        return larger[0]

    def decode_rows(self, tokens: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
                    first: torch.Tensor | None = None) -> torch.Tensor:
        """Rows at their own positions, as Transformer.decode_rows: tokens, slots, rows int64 [B] on the host ->
        float32 logits [B, vocab] (a view of a static buffer, valid until the next call). `first`: int64 [m] on
        the device, the tokens of rows 0..m-1 (a step's draws not yet read on the host; tokens[:m] are then
        ignored). Waits for nothing queued on the device: the inputs go through pinned memory. Replays the graph
        of the batch bucket lanes_for(B) and the context bucket of max(slots); the lanes beyond B write slot 0 of
        the cache's last row (the spare row, which the caller must leave to no request)."""
        self._check_cache()
        n = tokens.shape[0]
        lanes = lanes_for(n)
        host = torch.zeros(3, lanes, dtype=torch.long, pin_memory=True)
        host[0, :n], host[1, :n], host[2, :n] = tokens, slots, rows
        host[2, n:] = self.model.cache_batch - 1
        capacity = bucket(self._buckets, int(host[1].max()))
        steps = self._steps_for(("rows", lanes), lanes, True)

        def fill(step):
            step.inputs.copy_(host, non_blocking=True)
            if first is not None and step.first:
                step.inputs[0, : first.shape[0]].copy_(first, non_blocking=True)

        return self._replay(steps, ("rows", lanes), capacity, fill)[:n]

    def capture_rows(self, max_rows: int) -> None:
        """Capture the per-row step of every batch bucket up to lanes_for(max_rows) and every context bucket now
        (a server's start), so no request stalls on a capture. Every lane writes only the spare row."""
        self._check_cache()
        spare = self.model.cache_batch - 1
        with torch.inference_mode():
            lanes = 1
            while True:
                for capacity in self._buckets:
                    self.decode_rows(torch.zeros(lanes, dtype=torch.long),
                                     torch.full((lanes,), capacity - 1, dtype=torch.long),
                                     torch.full((lanes,), spare, dtype=torch.long))
                if lanes >= max_rows:
                    break
                lanes *= 2

    def _check_cache(self) -> None:
        if self.model.cache_version != self._cache_version:  # a new cache: captured pointers are stale
            self._steps.clear()
            self._graphs.clear()
            # and the pools go too: the allocator releases a pool once its last graph is freed, and capturing
            # into that released pool again fails an internal assert (a batch after a single prompt did)
            self._pools.clear()
            self._cache_version = self.model.cache_version
            self._buckets = buckets(self.model.max_seq_len, sliding_window(self.model))

    def _steps_for(self, key, batch: int, per_row: bool) -> list[DecodeStep]:
        steps = self._steps.get(key)
        if steps is None:
            steps = self._steps[key] = segments(self.model, batch, per_row=per_row)
        return steps

    def _has(self, key, capacity: int, segments: int) -> bool:
        return all((key, capacity, index) in self._graphs for index in range(segments))

    def _capture_ahead(self, steps: list[DecodeStep], key, capacity: int) -> None:
        """Capture the graphs of bucket `capacity` without replaying them. Their eager run writes cache slot
        capacity - 1, which the sequence writes again before any query reads it (it is beyond the current slot);
        the queued step has read its inputs first (same stream), and the next call fills them again."""
        for index, step in enumerate(steps):
            with _current(step.device):
                step.slot.fill_(capacity - 1)
                self._graphs[(key, capacity, index)] = self._timed_capture(step, capacity)

    def _replay(self, steps: list[DecodeStep], key, capacity: int, fill) -> torch.Tensor:
        """Fill each step's inputs (`fill(step)`, on its device), hand the hidden state on, replay (capturing on
        first use) the graphs (batch key `key`, capacity, segment index); the last step's logits."""
        outputs = None
        for index, step in enumerate(steps):
            with _current(step.device):
                fill(step)
                if outputs is not None:
                    step.feed(outputs)
                captured = self._graphs.get((key, capacity, index))
                if captured is None:
                    captured = self._graphs[(key, capacity, index)] = self._timed_capture(step, capacity)
                graph, outputs = captured
                graph.replay()
        return outputs

    def capture_first(self, batch: int = 1, every: bool = False) -> None:
        """Capture the first context bucket of a `batch`-row step now (at load): its eager run compiles the
        kernels and tunes the GEMVs, so a later bucket costs only its capture. `every`: every bucket now (the
        load before lazy capture: TALIS_CAPTURE_ALL=1, for comparisons). The steps write cache slots that a
        generation always writes again before reading them."""
        device = self.model.model.embed_tokens.weight.device
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        sizes = buckets(self.model.max_seq_len, sliding_window(self.model))
        reach, self._reach = self._reach, None  # no capture ahead of need from these steps
        try:
            with torch.inference_mode():
                for capacity in sizes if every else sizes[:1]:
                    self(tokens, capacity - 1)
                # a later bucket whose attention launch Triton compiles apart runs once eagerly now: its capture
                # mid-reply then costs no compile
                steps = self._steps_for(batch, batch, False)
                compiled = {attention_variant(steps[0], sizes[0])}
                for capacity in [] if every else sizes[1:]:
                    variant = attention_variant(steps[0], capacity)
                    if variant not in compiled:
                        compiled.add(variant)
                        self._run_eager(steps, capacity)
        finally:
            self._reach = reach
        self.load_captures = len(self.capture_s)

    def _run_eager(self, steps: list[DecodeStep], capacity: int) -> None:
        """The steps once, eagerly, at slot capacity - 1 (a slot a generation writes again before reading it)."""
        outputs = None
        for step in steps:
            with _current(step.device):
                step.slot.fill_(capacity - 1)
                if outputs is not None:
                    step.feed(outputs)
                outputs = step.run(capacity)

    def _timed_capture(self, step: DecodeStep, capacity: int) -> tuple[torch.cuda.CUDAGraph, object]:
        start = time.perf_counter()
        captured = self._capture(step, capacity)
        self.capture_s.append(time.perf_counter() - start)
        return captured

    def _capture(self, step: DecodeStep, capacity: int) -> tuple[torch.cuda.CUDAGraph, object]:
        """(graph, its outputs) of `step`, under step.device made current by the caller."""
        # The eager run writes the same cache slot the replay will write, from the same inputs, so it changes
        # nothing; it tunes kernels and warms the allocator outside the capture, on a side stream as capture
        # requires: the device's one capture stream, which the capture then uses too (talis_cli.capture_stream:
        # one cuBLAS workspace per device, not one per capture).
        stream = capture_stream(step.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step.run(capacity)
        torch.cuda.current_stream().wait_stream(stream)
        if step.device not in self._pools:  # each device has its own memory pool
            self._pools[step.device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pools[step.device], stream=stream):
            outputs = step.run(capacity)
        return graph, outputs


def attention_variant(step: DecodeStep, capacity: int) -> tuple:
    """What Triton compiles apart in the decode attention of `step` over `capacity` slots: the launch's splits,
    block, warps and stages (compile-time constants) and how the chunk length specializes (Triton compiles an
    integer argument apart when it is 1 or a multiple of 16)."""
    rows = step.tokens.numel() * step.model.args.n_heads
    launch = ops.attention_launch(capacity, rows, step.n_sms)
    return launch.splits, launch.block, launch.warps, launch.stages, launch.chunk % 16 == 0, launch.chunk == 1


def _current(device: torch.device):
    """`device` made the current CUDA device (nothing to do for a CPU step: tests of the bucket logic)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def attention_kernel_takes(head_dim: int) -> bool:
    """Whether the decode attention kernel serves heads of `head_dim`: a power of two (its tiles span a head) of
    at least 16 (a tl.dot operand)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def graph_devices(model) -> list[torch.device] | None:
    """The CUDA devices of `model`'s decoder layers in order, one per run of layers, when the CUDA-graph step can
    take it: heads the attention kernel serves (`attention_kernel_takes`), every parameter and buffer on CUDA,
    the embedding with the first layer and the final norm and lm_head with the last (as device maps place them).
    None otherwise (the plain path). A model split over several GPUs gets one graph per device (`segments`).
    """
    if not attention_kernel_takes(model.args.head_dim):
        return None
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return None
    layers = [layer.input_layernorm.weight.device for layer in model.model.layers]
    if (model.model.embed_tokens.weight.device != layers[0]
            or {model.model.norm.weight.device, model.logits_device} != {layers[-1]}):
        return None
    return [device for i, device in enumerate(layers) if i == 0 or device != layers[i - 1]]


def accelerate(model, generator=None, prefill_graphs: bool = True) -> CudaGraphDecoder | None:
    """Fuse q/k/v and gate/up, then (model on CUDA GPUs, see `graph_devices`) give `generator` the CUDA-graph
    decode step and the fast prefill (fast_prefill.prefill_runner, replaying CUDA graphs with `prefill_graphs`).

    Returns the runner, or None where the model stays on the plain path.
    """
    fuse_model(model)
    if graph_devices(model) is None:
        return None
    runner = CudaGraphDecoder(model)
    # the other buckets on first use or ahead of need; TALIS_CAPTURE_ALL=1: all of them now (comparisons)
    runner.capture_first(model.cache_batch, every=os.environ.get("TALIS_CAPTURE_ALL") == "1")
    if generator is not None:
        generator.fast_decode = runner
        # prompts replay CUDA graphs of up to 512 tokens from the second use of a bucket (a chat's next turns)
        generator.prefill = prefill_runner(model, graphs=prefill_graphs)
    return runner
