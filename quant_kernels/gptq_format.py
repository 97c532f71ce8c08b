"""The GPTQ weight format: bit-packing into int32 words and the reference dequantization.

Values are packed as a little-endian bit stream per column (or per row for `*_cols`): value i occupies
bits [bits*i, bits*i + bits) of the stream, word j holds stream bits [32*j, 32*j + 32). For 2, 4 and 8 bits
a word holds 32/bits whole values; 3-bit values straddle words (32 values in 3 words).
"""

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD_MASK = 0xFFFFFFFF
# Rows handled per step, a multiple of 32 so every chunk starts on a word boundary for every bit width.
_CHUNK_ROWS = 4096


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_length(count: int, bits: int) -> int:
    """Number of int32 words that hold `count` values of `bits` bits."""
    return -(-count * bits // 32)


def _positions(count: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of each of `count` values in the stream, both int64 [count]."""
    pos = torch.arange(count, device=device, dtype=torch.int64) * bits
    return pos // 32, pos % 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_chunk(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: int [K, N], values in [0, 2**bits) -> int32 [ceil(K*bits/32), N]."""
    count, n = q.shape
    n_words = packed_length(count, bits)
    word, shift = _positions(count, bits, q.device)
    shifted = q.to(torch.int64) << shift[:, None]  # may reach past bit 32: that part spills into the next word
    acc = torch.zeros(n_words, n, dtype=torch.int64, device=q.device)
    acc.index_add_(0, word, shifted)  # bit ranges within a word are disjoint, so the sum is a bitwise or
    spill = torch.cat([torch.zeros_like(acc[:1]), acc[:-1] >> 32])
    return _to_int32((acc & _WORD_MASK) | spill)


def _unpack_chunk(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """words: int32 [W, N] -> int32 [count, N], the first `count` values of each column's stream."""
    word, shift = _positions(count, bits, words.device)
    low = words[word]  # word holding each value's first bit, (count, N)
    values = low >> shift.to(torch.int32)[:, None]
    if 32 % bits:  # values may straddle two words
        # int32 shifts are arithmetic: drop the copied sign bits, then or in the high part from the next word;
        # a left shift by 32 - shift >= bits (clamped to 31 where shift is 0) leaves nothing under the mask.
        values &= _to_int32((1 << (32 - shift)) - 1)[:, None]
        high = torch.cat([words[1:], torch.zeros_like(words[:1])])[word]
        values |= high << (32 - shift).clamp(max=31).to(torch.int32)[:, None]
    return values & (2**bits - 1)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values along dim 0 (how `qweight` packs input rows).

    q: integer tensor [K, N] with values in [0, 2**bits).
    Returns int32 [ceil(K*bits/32), N]; a partial last word is zero-padded.
    """
    _check_bits(bits)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"values to pack must lie in [0, {2**bits}), got [{int(q.min())}, {int(q.max())}]")
    chunks = [_pack_chunk(q[start:start + _CHUNK_ROWS], bits) for start in range(0, q.shape[0], _CHUNK_ROWS)]
    return torch.cat(chunks) if chunks else torch.zeros(0, q.shape[1], dtype=torch.int32, device=q.device)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [ceil(rows*bits/32), N] -> int32 [rows, N] with values in [0, 2**bits)."""
    _check_bits(bits)
    if packed.shape[0] < packed_length(rows, bits):
        raise ValueError(f"{packed.shape[0]} packed rows cannot hold {rows} values of {bits} bits")
    words_per_chunk = _CHUNK_ROWS * bits // 32
    chunks = [_unpack_chunk(packed[start * bits // 32:][:words_per_chunk], bits, min(_CHUNK_ROWS, rows - start))
              for start in range(0, rows, _CHUNK_ROWS)]
    return torch.cat(chunks) if chunks else torch.zeros(0, packed.shape[1], dtype=torch.int32, device=packed.device)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values along dim 1 (how `qzeros` packs output columns): [G, N] -> int32 [G, ceil(N*bits/32)]."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_cols`: int32 [G, ceil(cols*bits/32)] -> int32 [G, cols]."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def zero_offset_for(checkpoint_format: str) -> int:
    """What the kernels add to stored zeros: 1 for "gptq" (v1 stores zero - 1), 0 for "gptq_v2"."""
    offsets = {"gptq": 1, "gptq_v2": 0}
    if checkpoint_format not in offsets:
        raise ValueError(f"checkpoint_format must be one of {sorted(offsets)}, got {checkpoint_format!r}")
    return offsets[checkpoint_format]


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """Group of each input row without act-order: int32 [in_features]; group_size -1 means a single group."""
    rows = torch.arange(in_features, dtype=torch.int32)  # on the CPU: integer division on meta is slow to set up
    return (torch.zeros_like(rows) if group_size == -1 else rows // group_size).to(device)


def valid_group_size(group_size: int) -> bool:
    """Group sizes the format allows: a power of two, or -1 for one group over all input rows."""
    return group_size == -1 or (group_size > 0 and group_size & (group_size - 1) == 0)


def num_groups(in_features: int, group_size: int) -> int:
    """Rows of `scales` / `qzeros` for a layer with `in_features` inputs."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def unpack_zeros(qzeros: torch.Tensor, bits: int, cols: int, zero_offset: int) -> torch.Tensor:
    """The zero points themselves, int32 [G, cols]: stored values plus the format's offset."""
    return unpack_cols(qzeros, bits, cols) + zero_offset


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, zero_offset: int) -> torch.Tensor:
    """The reference dequantization: float weights [K, N] (input rows, output columns) in scales' dtype.

    qweight: int32 [ceil(K*bits/32), N]; qzeros: int32 [G, ceil(N*bits/32)]; scales: float [G, N];
    g_idx: int [K], the group of each input row (any order, act-order included).
    w[i, c] = scales[g_idx[i], c] * (q[i, c] - (z[g_idx[i], c] + zero_offset)).
    """
    rows, cols = g_idx.shape[0], scales.shape[1]
    q = unpack_rows(qweight, bits, rows)
    zeros = unpack_zeros(qzeros, bits, cols, zero_offset)
    groups = g_idx.long()
    return scales[groups] * (q - zeros[groups]).to(scales.dtype)
