"""The fast prefill: one prompt's forward with a few launches per layer, for models on CUDA GPUs.

The eager `Transformer.forward` issues ~50 small torch ops per layer (RMSNorm alone ~8, rotary ~12, the cache
copies, the residual adds, SiLU*mul); for a short prompt their host launch cost exceeds the GPU work (128 tokens
on a 7B: 27.7 ms wall for 13.1 ms of GPU time on an H200). `PrefillRunner` computes the same function as
`Transformer.forward(tokens[1, T], start_pos, last_only=True)` with, per layer: add + RMSNorm (one kernel), the
fused q/k/v projection, rotary + KV-cache write of all T tokens (`prefill_ops.rotary_to_cache`), SDPA over the
cache slice, o_proj, add + RMSNorm, the fused gate/up projection, SiLU*mul, down_proj. The final norm and lm_head
(and the last layer's o_proj and MLP) run on the last token only, as `last_only` needs nothing else.

It covers one row at any start position (a chat's continued prompt), into any cache row (`cache_row`: the
scheduler's single-row prefill), sliding windows, every rope type (dynamic NTK included: its tables are made
per call, as the eager forward makes them) and an 8-bit KV cache (written quantized, read back dequantized for
SDPA). A batch of several rows, a model without a KV cache, or a head_dim
that is not a power of two go to the eager forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quant_kernels import triton_ops as ops
from quant_kernels.prefill_ops import rotary_to_cache
from quant_kernels.triton_backend import forward_gathered, input_gather
from quant_kernels.triton_gemv import MAX_ROWS

from . import rope
from .capture_stream import capture_stream
from .model import attention_mask, current_device


BUCKETS = (16, 32, 64, 128, 256)  # prompt lengths a CUDA graph is captured for (start_pos 0, padded at the end)


class PrefillRunner:
    """`runner(tokens, start_pos, cache_row)` fills the KV cache of `model` (talis_cli.model.Transformer with a
    cache) for one row and returns the last token's float32 logits [1, 1, vocab], as
    `model(tokens, start_pos=start_pos, last_only=True)` does (with `cache_row`, into that row of the cache).

    Rotary tables are built once per device from the model's own `rotary` (so every rope scaling matches the eager
    forward) and rebuilt when the cache changes (setup_cache); dynamic NTK builds them per call.

    With `graphs` (a model on one GPU), a short prompt at start_pos 0 in cache row 0 is padded at its end to the
    next of BUCKETS and replayed as a CUDA graph, so its ~14 launches per layer cost one. Causal attention keeps the
    real tokens' outputs exact; the padding's keys and values land in the slots after the prompt, which decode
    (and a continued prompt) write before any query reads them. A bucket is captured on its second prompt, so a
    lone prompt never pays for a capture; a new cache (setup_cache) drops the graphs. The logits of a
    replay are a static buffer, valid until the next call.
    """

    def __init__(self, model, graphs: bool = False):
        self.model = model
        self.graphs = graphs
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_version = None
        self._seen: set[int] = set()  # buckets used once (captured at their next use)
        self._captured: dict[int, tuple] = {}  # bucket -> (graph, tokens [bucket], last [1], logits)
        self._pool = None

    def covers(self, tokens: torch.Tensor) -> bool:
        """Whether the fused path runs these tokens (else the eager forward does)."""
        return tokens.dim() == 2 and tokens.shape[0] == 1 and self._fused_model()

    def _fused_model(self) -> bool:
        """Whether the fused path takes this model: a KV cache, and a head_dim the kernels' blocks can span (a
        power of two)."""
        return self.model.has_cache and self.model.args.head_dim & (self.model.args.head_dim - 1) == 0

    def bucket(self, T: int, start_pos: int, cache_row: int | None) -> int | None:
        """The padded length a CUDA graph runs T tokens at, None where graphs do not apply: start_pos > 0, another
        cache row, a sliding window or dynamic NTK (both depend on the real length), a prompt longer than the
        largest bucket, or a bucket beyond the cache."""
        if not self.graphs or start_pos or cache_row or self.model.args.sliding_window is not None:
            return None
        if rope.is_dynamic(self.model.args):
            return None
        size = next((b for b in BUCKETS if b >= T), None)
        return size if size is not None and size <= self.model.max_seq_len else None

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, cache_row: int | None = None, *,
                 last_only: bool = True) -> torch.Tensor:
        """tokens int64 [1, T] at cache slots start_pos..start_pos+T-1 of cache row `cache_row` (default 0)
        -> float32 logits [1, 1, vocab] of the last token. Called as the model is called (keywords start_pos,
        cache_row, last_only), so a caller can take either; last_only=False (every token's logits) runs the eager
        forward."""
        if not self.covers(tokens) or not last_only:
            row = {} if cache_row is None else {"cache_row": cache_row}  # the eager forward's own argument
            return self.model(tokens, start_pos=start_pos, last_only=last_only, **row)
        self._check_cache()
        T = tokens.shape[1]
        bucket = self.bucket(T, start_pos, cache_row)
        if bucket is not None and (bucket in self._captured or bucket in self._seen):
            return self._replay(bucket, tokens[0])
        if bucket is not None:
            self._seen.add(bucket)
        return self.forward(tokens[0], start_pos, 0 if cache_row is None else cache_row)

    def padded(self, tokens: torch.Tensor, bucket: int) -> torch.Tensor:
        """What a graph of `bucket` computes, run eagerly: tokens int64 [1, T] padded at the end to `bucket`
        (T <= bucket <= the cache length), slots 0..bucket-1 of cache row 0 filled -> logits [1, 1, vocab] of
        token T-1."""
        T = tokens.shape[1]
        device = self.model.model.embed_tokens.weight.device
        filled = torch.zeros(bucket, dtype=torch.long, device=device)
        filled[:T] = tokens[0]
        return self.forward(filled, 0, 0, last=torch.tensor([T - 1], device=device))

    def prefill_segments(self, segments: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """Several prompts (or chunks of them) in one forward: segments of (token ids, start_pos, cache row), each
        into its own cache row (distinct rows) -> float32 logits [len(segments), vocab] of each one's last token,
        as one `__call__` per segment gives. The projections run once over all the segments' tokens (a server's
        newcomers share one weight read); rotary, the cache write and attention run per segment. A model the
        fused path does not take (`covers`) runs one eager forward per segment."""
        device = self.model.model.embed_tokens.weight.device
        if not self._fused_model():
            return torch.cat([self(torch.tensor([ids], device=device), start, row)[:, -1]
                              for ids, start, row in segments])
        self._check_cache()
        flat = torch.tensor([t for ids, _, _ in segments for t in ids], device=device)
        return self.forward(flat, [(len(ids), start, row) for ids, start, row in segments])[:, 0]

    def forward(self, tokens: torch.Tensor, start_pos: int | list[tuple[int, int, int]], row: int = 0,
                last: torch.Tensor | None = None):
        """The fused prefill: tokens int64 [T] into slots start_pos.. of cache row `row` -> logits [1, 1, vocab]
        of token T-1, or of token last[0] (int64 [1] on the embedding's device: a device index, so a CUDA graph
        can take it; the tokens after it are padding). With start_pos a list of segments (length, start_pos,
        cache row) splitting the tokens: logits [segments, 1, vocab] of each segment's last token."""
        self._check_cache()
        model = self.model
        segments = start_pos if isinstance(start_pos, list) else [(tokens.shape[0], start_pos, row)]
        embed = model.model.embed_tokens
        x = embed(tokens.to(embed.weight.device))  # [T, dim]
        parts = [_Segment(offset, T, start, row, model.args.sliding_window, x.device)
                 for (T, start, row), offset in zip(segments, _offsets(segments))]
        tables = {}  # device -> each segment's (cos, sin)
        residual = x  # the residual stream (a fresh tensor), updated in place by each fused add + norm
        out = None  # the layer's output before it joins the residual stream (in the next fused add + norm)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            device = layer.input_layernorm.weight.device
            if residual.device != device:  # a device-map boundary: the hidden state and residual stream move
                residual, out = residual.to(device), (out.to(device) if out is not None else None)
                last = last.to(device) if last is not None else None
            if device not in tables:
                tables[device] = [self._rotary(part.start, part.T, device, x.dtype) for part in parts]
            with current_device(device):
                q, k, v = _norm_qkv(out, residual, layer, residual.shape[0])
                final = i == len(layers) - 1  # past its attention only each segment's last token is needed
                ys = [part.attention(layer.self_attn.kv_cache, q, k, v, *table, final and last is None)
                      for part, table in zip(parts, tables[device])]
                y = ys[0] if len(ys) == 1 else torch.cat(ys)  # [T or one per segment, heads*hd]
                if final:  # padding follows token last[0] (a graph), or keep each segment's last token
                    ends = last if last is not None else torch.tensor([p.offset + p.T - 1 for p in parts],
                                                                      device=device)
                    residual = residual.index_select(0, ends)
                    y = y.index_select(0, last) if last is not None else y
                out = _mlp(layer.self_attn.o_proj(y), residual, layer, y.shape[0])
        norm, head = model.model.norm, model.lm_head
        device = norm.weight.device
        with current_device(device):  # Triton launches on the current device (model.current_device)
            h = ops.rms_norm(out.to(device), norm.weight, norm.eps, residual.to(device))
        device = model.logits_device
        with current_device(device):
            return head(h.to(device)).float()[:, None]

    # --- CUDA graphs ----------------------------------------------------------------------------------------
    def _check_cache(self) -> None:
        """A new KV cache (setup_cache): the tables may be too short and captured pointers are stale."""
        if self.model.cache_version != self._cache_version:
            self._tables.clear()
            self._seen.clear()
            self._captured.clear()
            self._pool = None  # capturing into the released pool of dropped graphs fails (fast_decode says why)
            self._cache_version = self.model.cache_version

    def _replay(self, bucket: int, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [1, 1, vocab] (a static buffer) of tokens int64 [T] through the graph of `bucket`, captured
        now if it is not yet."""
        captured = self._captured.get(bucket)
        if captured is None:
            captured = self._captured[bucket] = self._capture(bucket, tokens)
        graph, tokens_in, last, logits = captured
        tokens_in[:tokens.shape[0]].copy_(tokens)  # the slots after the prompt keep whatever padding they had
        last.fill_(tokens.shape[0] - 1)
        graph.replay()
        return logits

    def _capture(self, bucket: int, tokens: torch.Tensor) -> tuple:
        """(graph, its tokens [bucket], its last index [1], its logits) for prompts of up to `bucket` tokens."""
        device = self.model.model.embed_tokens.weight.device
        tokens_in = torch.zeros(bucket, dtype=torch.long, device=device)
        tokens_in[:tokens.shape[0]] = tokens
        last = torch.full((1,), tokens.shape[0] - 1, dtype=torch.long, device=device)
        # An eager run first (on a side stream, as capture requires) tunes the kernels and sizes the scratch
        # buffers outside the capture; it writes the slots the replay writes again.
        # Warm-up and capture on the device's one capture stream: one cuBLAS workspace (talis_cli.capture_stream).
        with torch.cuda.device(device):
            stream = capture_stream(device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(tokens_in, 0, 0, last)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                logits = self.forward(tokens_in, 0, 0, last)
        return graph, tokens_in, last, logits

    def _rotary(self, start_pos: int, T: int, device: torch.device, dtype: torch.dtype):
        """cos, sin [T, hd] (contiguous) of cache slots start_pos..start_pos+T-1 in `dtype` on `device`."""
        if rope.is_dynamic(self.model.args):  # the frequencies follow this forward's largest position
            slots = torch.arange(start_pos, start_pos + T, device=device)
            cos, sin = self.model.rotary(slots[None], dtype)  # [1, 1, T, hd]
            return cos[0, 0].contiguous(), sin[0, 0].contiguous()
        tables = self._tables.get(device)
        if tables is None:
            positions = torch.arange(self.model.max_seq_len, device=device)[None]
            cos, sin = self.model.rotary(positions, dtype)  # [1, 1, S, hd]: the eager model's own tables
            tables = self._tables[device] = (cos[0, 0].contiguous(), sin[0, 0].contiguous())
        return tables[0][start_pos:start_pos + T], tables[1][start_pos:start_pos + T]


PAD_LIMIT = 2048  # slots up to which a continued prompt pads its queries rather than masking (_Segment)


class _Segment:
    """One prompt (or chunk) of a prefill: tokens offset..offset+T-1 of the forward go to slots start..start+T-1 of
    cache row `row`; its attention mask, made once (None: plain causal attention, its queries zero-padded at the
    front by `pad` rows where the prompt continues a short prefix)."""

    def __init__(self, offset: int, T: int, start: int, row: int, window: int | None, device: torch.device):
        self.offset, self.T, self.start, self.row, self.window = offset, T, start, row, window
        # the cache slots any query here may see: the earlier ones are outside every sliding window
        self.key_start = max(0, start - window + 1) if window else 0
        self.end = start + T
        self.mask = None
        # A continued prompt (a chat's next turn, a reused prefix, a long prompt's next chunk) runs causal
        # attention over start + T zero-padded queries instead of a mask: SDPA with an explicit mask took ~0.9 ms
        # of host time a call on an H200 (BENCHMARKS.md, 2026-12-01, the scheduler's profile), which a prefill
        # pays in every layer, while the padded queries' extra work stays well under that up to PAD_LIMIT slots.
        # Longer contexts keep the mask.
        self.pad = start if T > 1 and window is None and 0 < start and start + T <= PAD_LIMIT else 0
        if T > 1 and not self.pad and (self.end - self.key_start != T or (window is not None and T > window)):
            slots = torch.arange(start, self.end, device=device)
            self.mask = attention_mask(slots, torch.arange(self.key_start, self.end, device=device), None, window)

    def attention(self, cache, q, k, v, cos, sin, last_only: bool) -> torch.Tensor:
        """Rotary and cache write of this segment's q, k, v rows ([T_all, *] of the whole forward), then its
        attention over its cache row -> [T, heads*hd], or [1, heads*hd] for its last query with `last_only`."""
        rows = slice(self.offset, self.offset + self.T)
        scales = {"k_scale": cache.k_scale[self.row], "v_scale": cache.v_scale[self.row]} if cache.quantized else {}
        q = rotary_to_cache(q[rows], k[rows], v[rows], cos, sin, cache.k[self.row], cache.v[self.row], self.start,
                            **scales)  # [heads, T, hd]
        first_key, mask = self.key_start, self.mask
        if mask is not None and mask.device != q.device:  # a device-map boundary
            mask = self.mask = mask.to(q.device)
        pad = self.pad
        if last_only:  # the last query sees every key of its window
            q, mask, pad = q[:, -1:], None, 0
            first_key = max(0, self.end - self.window) if self.window else 0
        if pad:  # query row pad + i (slot start + i) sees keys 0..start + i: causal from the top left
            q = torch.cat([q.new_zeros(q.shape[0], pad, q.shape[2]), q], dim=1)
        keys, values = cache.read(slice(self.row, self.row + 1), first_key, self.end)  # 8-bit: dequantized
        y = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=mask,
                                           is_causal=mask is None and q.shape[1] > 1,
                                           enable_gqa=keys.shape[1] != q.shape[0])  # [1, heads, T or 1, hd]
        return y[0, :, pad:].transpose(0, 1).reshape(q.shape[1] - pad, -1)


def _offsets(segments) -> list[int]:
    offsets, at = [], 0
    for T, _, _ in segments:
        offsets.append(at)
        at += T
    return offsets


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
    lets it replay CUDA graphs for short prompts at slot 0 (on one GPU only).

    Graphs stay off in `generate` for now: the Generator continues a prompt that starts with what the cache holds
    (a chat's next prompt, or any prompt after one that shares its BOS) from the first differing slot, so nearly
    every prompt after the first starts past slot 0, and the first one of a bucket is never captured.
    """
    from .fast_decode import graph_devices

    devices = graph_devices(model)
    return PrefillRunner(model, graphs=graphs and len(devices) == 1) if devices is not None else None
