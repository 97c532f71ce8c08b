"""The fast prefill: prompts' forwards with a few launches per layer, for models on CUDA GPUs.

The eager `Transformer.forward` issues ~50 small torch ops per layer (RMSNorm alone ~8, rotary ~12, the cache
copies, the residual adds, SiLU*mul); for a short prompt their host launch cost exceeds the GPU work (128 tokens
on a 7B: 27.7 ms wall for 13.1 ms of GPU time on an H200). `PrefillRunner` computes the same function as
`Transformer.forward(tokens[1, T], start_pos, last_only=True)` with, per layer: add + RMSNorm (one kernel), the
fused q/k/v projection, rotary + KV-cache write (`prefill_ops.rotary_to_cache`), causal attention over the cache
(`prefill_ops.ragged_attention`), o_proj, add + RMSNorm, the fused gate/up projection, SiLU*mul, down_proj. The
final norm and lm_head (and the last layer's o_proj and MLP) run on the last token only.

One forward takes a ragged batch: several prompts (or chunks of them, "segments") back to back, each at its own
start position in its own cache row (the scheduler's newcomers of one step share the weight reads); where each
token goes is data (device tensors: `_Layout`), not launch shapes, so with `graphs` any mix of segments whose
tokens fit a bucket replays one CUDA graph. It covers sliding windows, every rope type (dynamic NTK included: its
tables are made per call, as the eager forward makes them, and then no graph) and an 8-bit KV cache (written
quantized, read back dequantized). A batch of several rows in one tensor, a model without a KV cache, or a
head_dim that is not a power of two go to the eager forward.
"""
from __future__ import annotations

import torch

from quant_kernels import triton_ops as ops
from quant_kernels.prefill_ops import BLOCK_M, query_blocks, ragged_attention, rotary_to_cache
from quant_kernels.triton_backend import forward_gathered, input_gather
from quant_kernels.triton_gemv import MAX_ROWS

from . import rope
from .capture_stream import capture_stream
from .model import current_device


# token counts a CUDA graph is captured for (the forward's tokens padded at the end); the scheduler prefills at
# most 512 tokens a step (scheduler.PREFILL_CHUNK)
BUCKETS = (16, 32, 64, 128, 256, 512)


def buckets_up_to(most: int) -> tuple[int, ...]:
    """The BUCKETS that forwards of 1..most tokens replay: each one below `most` and the first at or above it."""
    return tuple(b for i, b in enumerate(BUCKETS) if i == 0 or BUCKETS[i - 1] < most)


class _Layout:
    """Where the N tokens of one forward go, as int64 device tensors: positions (rotary table rows), rows and slots
    of the cache (slot -1: padding, not stored) [N], ragged_attention's blocks [NB, 4] and the index of each
    segment's last token `ends` [S] (extra entries, for a graph's fixed shapes, are zeros: unused blocks, and
    logits of token 0), plus the rotary tables cos, sin [P, hd] the positions index. `host(...)` gives the int64
    vector a graph's static layout is refreshed from."""

    def __init__(self, packed: torch.Tensor, n: int, n_blocks: int, cos: torch.Tensor, sin: torch.Tensor,
                 padded: bool):
        self.packed, self.n, self.n_blocks, self.cos, self.sin = packed, n, n_blocks, cos, sin
        self.padded = padded  # whether tokens may be padding (a graph's layout)
        self.positions, self.rows, self.slots = packed[:n], packed[n:2 * n], packed[2 * n:3 * n]
        self.blocks = packed[3 * n:3 * n + 4 * n_blocks].view(n_blocks, 4)
        self.ends = packed[3 * n + 4 * n_blocks:]
        self._moved: dict[torch.device, _Layout] = {}

    @staticmethod
    def host(segments, n: int, n_blocks: int, n_ends: int, table_positions: bool) -> torch.Tensor:
        """The packed int64 vector (on the CPU) of `segments` [(T, start, row)] padded to n tokens, n_blocks blocks
        and n_ends ends; positions are slots (table_positions) or 0..T-1 (tables made for this forward)."""
        positions, rows, slots, ends, at = [], [], [], [], 0
        for T, start, row in segments:
            slots += range(start, start + T)
            rows += [row] * T
            at += T
            ends.append(at - 1)
        positions = list(slots) if table_positions else list(range(at))
        pad = n - at
        blocks = [v for block in query_blocks(segments) for v in block]
        blocks += [0] * (4 * n_blocks - len(blocks))
        return torch.tensor(positions + [0] * pad + rows + [0] * pad + slots + [-1] * pad + blocks
                            + ends + [0] * (n_ends - len(ends)), dtype=torch.long)

    def on(self, device: torch.device, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> "_Layout":
        """This layout on `device` (a device-map boundary), moved once; with `tables`, those rotary tables (already
        on `device`) instead of a copy of this layout's."""
        if self.packed.device == device:
            return self
        moved = self._moved.get(device)
        if moved is None:
            cos, sin = tables or (self.cos.to(device), self.sin.to(device))
            moved = self._moved[device] = _Layout(self.packed.to(device), self.n, self.n_blocks, cos, sin,
                                                  self.padded)
        return moved


class PrefillRunner:
    """`runner(tokens, start_pos, cache_row)` fills the KV cache of `model` (talis_cli.model.Transformer with a
    cache) for one row and returns the last token's float32 logits [1, 1, vocab], as
    `model(tokens, start_pos=start_pos, last_only=True)` does (with `cache_row`, into that row of the cache);
    `prefill_segments` does it for several prompts in one forward.

    Rotary tables are built once per device from the model's own `rotary` (so every rope scaling matches the eager
    forward) and rebuilt when the cache changes (setup_cache); dynamic NTK builds them per call.

    With `graphs` (a model on one GPU), a forward of up to 512 tokens in at most as many segments as the cache has
    rows (each segment in a row of its own: the callers' contract, as for prefill_segments) is
    padded at its end to the next of BUCKETS and replayed as a CUDA graph, so its ~12 launches per layer cost
    one. The padding's keys and values are not stored and no real query sees them. A bucket is captured on its
    second use, so a lone prompt never pays for a capture; a new cache (setup_cache) drops the graphs. The logits
    of a replay are a static buffer, valid until the next call.
    """

    def __init__(self, model, graphs: bool = False):
        self.model = model
        self.graphs = graphs
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_version = None
        self._seen: set[int] = set()  # buckets used once (captured at their next use)
        self._captured: dict[int, tuple] = {}  # bucket -> (graph, tokens [bucket], layout, logits)
        self._pool = None

    def covers(self, tokens: torch.Tensor) -> bool:
        """Whether the fused path runs these tokens (else the eager forward does)."""
        return tokens.dim() == 2 and tokens.shape[0] == 1 and self._fused_model()

    def _fused_model(self) -> bool:
        """Whether the fused path takes this model: a KV cache, and a head_dim the kernels' blocks can span (a
        power of two)."""
        return self.model.has_cache and self.model.args.head_dim & (self.model.args.head_dim - 1) == 0

    def bucket(self, n_tokens: int, n_segments: int = 1) -> int | None:
        """The padded token count a CUDA graph runs a forward of n_tokens in n_segments at, None where graphs do
        not apply: graphs off, a model the fused path does not take (`covers`), dynamic NTK (its tables depend on
        the real positions), more tokens than the largest bucket, or more segments than the cache has rows."""
        if not self.graphs or not self._fused_model() or rope.is_dynamic(self.model.args):
            return None
        if n_segments > self.model.cache_batch:
            return None
        return next((b for b in BUCKETS if b >= n_tokens), None)

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, cache_row: int | None = None, *,
                 last_only: bool = True) -> torch.Tensor:
        """tokens int64 [1, T] at cache slots start_pos..start_pos+T-1 of cache row `cache_row` (default 0)
        -> float32 logits [1, 1, vocab] of the last token. Called as the model is called (keywords start_pos,
        cache_row, last_only), so a caller can take either; last_only=False (every token's logits) runs the eager
        forward. The logits may be a graph's static buffer (`run`)."""
        if not self.covers(tokens) or not last_only:
            row = {} if cache_row is None else {"cache_row": cache_row}  # the eager forward's own argument
            return self.model(tokens, start_pos=start_pos, last_only=last_only, **row)
        return self.run(tokens[0], [(tokens.shape[1], start_pos, cache_row or 0)])

    def prefill_segments(self, segments: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """Several prompts (or chunks of them) in one forward: segments of (token ids, start_pos, cache row), each
        into its own cache row (distinct rows) -> float32 logits [len(segments), vocab] of each one's last token,
        as one `__call__` per segment gives (possibly a graph's static buffer: `run`). A model the fused path does
        not take (`covers`) runs one eager forward per segment."""
        device = self.model.model.embed_tokens.weight.device
        if not self._fused_model():
            return torch.cat([self(torch.tensor([ids], device=device), start, row)[:, -1]
                              for ids, start, row in segments])
        flat = torch.tensor([t for ids, _, _ in segments for t in ids], device=device)
        return self.run(flat, [(len(ids), start, row) for ids, start, row in segments])[:, 0]

    def run(self, tokens: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """tokens int64 [N] (on the embedding's device), segments [(T, start_pos, cache row)] splitting them in
        order -> float32 logits [len(segments), 1, vocab] of each segment's last token; a CUDA graph's replay where
        one applies (`bucket`), whose logits are a view of its static buffer: read them (or clone them) before the
        next call, which may replay the same graph. Raises ValueError for segments the cache cannot hold
        (`_check_segments`)."""
        self._check_cache()
        self._check_segments(tokens, segments)
        bucket = self.bucket(tokens.shape[0], len(segments))
        if bucket is not None and (bucket in self._captured or bucket in self._seen):
            return self._replay(bucket, tokens, segments)
        if bucket is not None:
            self._seen.add(bucket)
        return self.forward(tokens, self.layout(segments, tokens.device))

    def padded(self, tokens: torch.Tensor, segments, bucket: int) -> torch.Tensor:
        """What a graph of `bucket` computes, run eagerly: tokens int64 [N] placed by `segments` as `run` takes
        them, padded at the end to `bucket` tokens -> logits [len(segments), 1, vocab]."""
        self._check_cache()
        self._check_segments(tokens, segments)
        filled = torch.zeros(bucket, dtype=torch.long, device=tokens.device)
        filled[:tokens.shape[0]] = tokens
        layout = self.layout(segments, tokens.device, bucket, self.model.cache_batch)
        return self.forward(filled, layout)[:len(segments)]

    def _check_segments(self, tokens: torch.Tensor, segments) -> None:
        """Raise ValueError unless `segments` [(T, start, row)] split tokens [N] and each fits the cache: the kernels
        take each token's row and slot as data and do not check them (a slot past the row lands in another head's
        slots or past the cache; the eager forward fails on such a prompt), and an empty segment has no last
        token to take logits of."""
        if sum(T for T, _, _ in segments) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} tokens for segments of {sum(T for T, _, _ in segments)} in all")
        rows, slots = self.model.cache_batch, self.model.max_seq_len
        for i, (T, start, row) in enumerate(segments):
            if T < 1:
                raise ValueError(f"segment {i} (cache row {row}) is empty")
            if start < 0 or start + T > slots or not 0 <= row < rows:
                raise ValueError(f"segment {i} (slots {start}..{start + T - 1} of cache row {row}) does not fit the "
                                 f"KV cache ({rows} rows of {slots} slots)")

    def layout(self, segments, device: torch.device, n: int | None = None, n_ends: int | None = None) -> _Layout:
        """The _Layout of `segments` on `device`, padded to n tokens and n_ends ends (a graph's sizes; default:
        exactly theirs). Blocks: as many as any n_ends segments of n tokens can need."""
        fixed = n is not None  # a graph's sizes, for any segments that fit them
        n, n_ends = n or sum(T for T, _, _ in segments), n_ends or len(segments)
        n_blocks = -(-n // BLOCK_M) + n_ends if fixed else len(query_blocks(segments))
        dynamic = rope.is_dynamic(self.model.args)
        packed = _Layout.host(segments, n, n_blocks, n_ends, table_positions=not dynamic).to(device)
        cos, sin = self._rotary(segments, device)
        return _Layout(packed, n, n_blocks, cos, sin, padded=fixed)

    def forward(self, tokens: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """The fused prefill: tokens int64 [N] placed by `layout` -> float32 logits [len(layout.ends), 1, vocab] of
        each segment's last token."""
        model = self.model
        window = model.args.sliding_window
        embed = model.model.embed_tokens
        x = embed(tokens.to(embed.weight.device))  # [N, dim]
        residual = x  # the residual stream (a fresh tensor), updated in place by each fused add + norm
        out = None  # the layer's output before it joins the residual stream (in the next fused add + norm)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            device = layer.input_layernorm.weight.device
            if residual.device != device:  # a device-map boundary: the hidden state and residual stream move
                residual, out = residual.to(device), (out.to(device) if out is not None else None)
            here = self._placed(layout, device)
            with current_device(device):
                q, k, v = _norm_qkv(out, residual, layer, residual.shape[0])
                cache = layer.self_attn.kv_cache
                scales = {"k_scale": cache.k_scale, "v_scale": cache.v_scale} if cache.quantized else {}
                q = rotary_to_cache(q, k, v, here.cos, here.sin, here.positions, here.rows, here.slots, cache.k,
                                    cache.v, **scales)
                # padding rows (a graph's) get zeros, not whatever memory held: they flow on through the layers
                y = ragged_attention(q, cache.k, cache.v, here.blocks, window,
                                     out=torch.zeros_like(q) if layout.padded else None, **scales)
                if i == len(layers) - 1:  # past its attention only each segment's last token is needed
                    residual, y = residual.index_select(0, here.ends), y.index_select(0, here.ends)
                out = _mlp(layer.self_attn.o_proj(y), residual, layer, y.shape[0])
        norm, head = model.model.norm, model.lm_head
        device = norm.weight.device
        with current_device(device):  # Triton launches on the current device (model.current_device)
            h = ops.rms_norm(out.to(device), norm.weight, norm.eps, residual.to(device))
        device = model.logits_device
        with current_device(device):
            return head(h.to(device)).float()[:, None]

    def _placed(self, layout: _Layout, device: torch.device) -> _Layout:
        """`layout` on `device` (moved once, at a device-map boundary) with the rotary tables this runner keeps
        there (dynamic NTK: this forward's own tables, moved)."""
        if layout.packed.device == device:
            return layout
        return layout.on(device, None if rope.is_dynamic(self.model.args) else self._rotary([], device))

    # --- CUDA graphs ----------------------------------------------------------------------------------------
    def _check_cache(self) -> None:
        """A new KV cache (setup_cache): the tables may be too short and captured pointers are stale."""
        if self.model.cache_version != self._cache_version:
            self._tables.clear()
            self._seen.clear()
            self._captured.clear()
            self._pool = None  # capturing into the released pool of dropped graphs fails (fast_decode says why)
            self._cache_version = self.model.cache_version

    def capture(self, bucket: int, row: int) -> None:
        """Capture the graph of `bucket` now (a server's warm-up), if graphs apply and it is not yet captured; its
        eager run and capture write throwaway keys and values into slots 0..min(bucket, cache slots) - 1 of cache
        row `row` (ValueError for a row the cache does not have)."""
        self._check_cache()
        if self.bucket(bucket) != bucket or bucket in self._captured:
            return
        device = self.model.model.embed_tokens.weight.device
        T = min(bucket, self.model.max_seq_len)
        tokens = torch.arange(1, T + 1, device=device) % self.model.args.vocab_size
        self._check_segments(tokens, [(T, 0, row)])
        self._captured[bucket] = self._capture(bucket, tokens, [(T, 0, row)])

    def _replay(self, bucket: int, tokens: torch.Tensor, segments) -> torch.Tensor:
        """Logits [len(segments), 1, vocab] (a view of a static buffer) of tokens int64 [N] placed by `segments`
        through the graph of `bucket`, captured now if it is not yet."""
        captured = self._captured.get(bucket)
        if captured is None:
            captured = self._captured[bucket] = self._capture(bucket, tokens, segments)
        graph, tokens_in, layout, logits = captured
        tokens_in[:tokens.shape[0]].copy_(tokens)  # the tokens after them are padding: any ids do
        layout.packed.copy_(_Layout.host(segments, layout.n, layout.n_blocks, layout.ends.numel(), True))
        graph.replay()
        return logits[:len(segments)]

    def _capture(self, bucket: int, tokens: torch.Tensor, segments) -> tuple:
        """(graph, its tokens [bucket], its layout, its logits [cache rows, 1, vocab]) for forwards of up to
        `bucket` tokens, captured with `tokens` and `segments` in place."""
        device = self.model.model.embed_tokens.weight.device
        tokens_in = torch.zeros(bucket, dtype=torch.long, device=device)
        tokens_in[:tokens.shape[0]] = tokens
        layout = self.layout(segments, device, bucket, self.model.cache_batch)
        # An eager run first (on a side stream, as capture requires) tunes the kernels and sizes the scratch
        # buffers outside the capture; it writes the slots the replay writes again.
        # Warm-up and capture on the device's one capture stream: one cuBLAS workspace (talis_cli.capture_stream).
        with torch.cuda.device(device):
            stream = capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(tokens_in, layout)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                logits = self.forward(tokens_in, layout)
        return graph, tokens_in, layout, logits

    def _rotary(self, segments, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P, hd] (contiguous, the model dtype) on `device`: the whole table of every cache slot, or with
        dynamic NTK each segment's own rows back to back (its frequencies follow that forward's positions)."""
        dtype = self.model.model.embed_tokens.weight.dtype
        if rope.is_dynamic(self.model.args):
            tables = []
            for T, start, _ in segments:
                slots = torch.arange(start, start + T, device=device)
                cos, sin = self.model.rotary(slots[None], dtype)  # [1, 1, T, hd]
                tables.append((cos[0, 0], sin[0, 0]))
            return torch.cat([c for c, _ in tables]).contiguous(), torch.cat([s for _, s in tables]).contiguous()
        tables = self._tables.get(device)
        if tables is None:
            positions = torch.arange(self.model.max_seq_len, device=device)[None]
            cos, sin = self.model.rotary(positions, dtype)  # [1, 1, S, hd]: the eager model's own tables
            tables = self._tables[device] = (cos[0, 0].contiguous(), sin[0, 0].contiguous())
        return tables


def _gather(module, rows: int) -> torch.Tensor | None:
    """The act-order input order of `module` (a QuantLinear on the Triton kernels, else None) when `rows` go to
    its GEMV (few rows); else None: the prefill GEMM (dequantize + cuBLAS) writes the weight in the original row
    order and reads x as it is."""
    return input_gather(module) if rows <= MAX_ROWS else None


def _project(module, h: torch.Tensor, gather: torch.Tensor | None) -> torch.Tensor:
    return module(h) if gather is None else forward_gathered(module, h)


def _norm_qkv(out, residual, layer, T: int):
    """q, k, v [T, *] of `layer` from its input norm of residual (+ out, added to the residual stream in place;
    None at the first layer, whose input is the residual stream itself)."""
    attn, norm = layer.self_attn, layer.input_layernorm
    module = attn.qkv_proj  # None where q, k, v were not fused
    gather = _gather(module, T)
    if out is None:
        h = ops.rms_norm(residual, norm.weight, norm.eps, gather=gather)
    else:
        h = ops.rms_norm(out, norm.weight, norm.eps, residual, gather=gather)
    if module is None:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    return attn.split_qkv(_project(module, h, gather))


def _mlp(o: torch.Tensor, residual: torch.Tensor, layer, rows: int) -> torch.Tensor:
    """The MLP's output [rows, dim] for attention output o (after o_proj), added to the residual stream first."""
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    fused = mlp.gate_up_proj
    gather = _gather(fused, rows)
    h = ops.rms_norm(o, norm.weight, norm.eps, residual, gather=gather)
    if fused is None:
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
    else:
        gate, up = _project(fused, h, gather).chunk(2, dim=-1)
    gather = _gather(mlp.down_proj, rows)
    return _project(mlp.down_proj, ops.silu_mul(gate, up, gather=gather), gather)


def prefill_runner(model, graphs: bool = False) -> PrefillRunner | None:
    """The fast prefill for `model` when it runs on CUDA GPUs (fast_decode.graph_devices), else None; `graphs`
    lets it replay CUDA graphs for forwards of up to 512 tokens (on one GPU only)."""
    from .fast_decode import graph_devices

    devices = graph_devices(model)
    return PrefillRunner(model, graphs=graphs and len(devices) == 1) if devices is not None else None
