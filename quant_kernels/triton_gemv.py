"""Fused dequantize + GEMV for one to a few rows of activations (the decode step).

Batch-1 decoding is memory bound: the kernel reads every packed int32 word of `qweight` exactly once, unpacks it
in registers and never writes fp16 weights anywhere. Each program owns BLOCK_N output columns and one slice of K
(split-K), so even narrow layers launch enough programs to keep every SM's memory pipeline busy. Split-K partial
sums meet in a shared fp32 workspace through atomic adds; the last program to finish a column block (counted by
an atomic ticket) writes the output and zeroes its workspace slice and ticket again, so one launch does the whole
job and the workspace is always clean for the next call (with programmatic dependent launch a GEMV touches it only
after the previous kernel has finished: see quant_kernels.pdl).

The inner loop works on pairs of fp16 values packed in one 32-bit register (PTX f16x2), two weights per
instruction: fp32 arithmetic per weight made the kernel instruction bound at ~6 instructions per weight.
- Words are repacked at load (triton_backend.prepare_weight) so that rows 2p and 2p+1 of a word sit at bit
  offsets BITS*p and 16 + BITS*p: one mask gives both, each in one 16-bit half.
- OR-ing 0x6400 (fp16 1024.0) into a half whose bits hold q at bit offset o (o + BITS <= 10) gives the fp16
  1024 + q * 2**o exactly, so values below bit 8 are unpacked in place and the others after one shift by 8 for
  the whole word (`unpack_offsets`); one f16x2 fused multiply-add by 2**-(BITS + o) plus a per-column addend
  leaves (q - zero) * 2**-BITS, also exact. The factor 2**-BITS keeps |weight| <= 1 so that fp16 products and
  sums of large activations cannot overflow.
- Products with the matching pair of activations accumulate in f16x2 for one word only (at most 16 products),
  then go to fp32; the fp32 sum over a group is multiplied by scale * 2**BITS. A word's activations come in one
  vector load.
Per 16 words and thread these cut the loop from 429 to 353 SASS instructions (sm_90, the 7B gate/up
configuration), 7B decode 2,052 -> 1,909 us per step on an H100 (BENCHMARKS.md, fifth session).
3-bit values, which GPTQ packs across word boundaries, come repacked at load in units of 32 rows: three words of
eight 4-bit slots, each slot's low 3 bits one value of rows 0-23 and its top bit one bit of a value of rows 24-31
(triton_backend.pack_3bit_units). The kernel gathers those top bits into a fourth word (three shifts and three
logic operations per unit and column) and reads all four as 4-bit words holding 3-bit values, with the same
unpacking: no value is read across a word boundary and the weight stays at 3/8 byte a value. Two such words share
one f16x2 sum (8 products a lane, as for 2-bit words). scripts/gemv_sass.py (sm_90, triton 3.6 as on the GPU
machine): 2.65 SASS instructions per weight in the loop (one unit a block), against 2.76 for 4-bit (BLOCK_KW 4);
with 3/4 of the bytes, 3-bit decode is the closer of the two to being instruction bound.
Under TRITON_INTERPRET=1 (no GPU, no PTX) the same arithmetic runs in plain fp32 Triton operations.
"""
import itertools

import torch
import triton
import triton.language as tl

from .autotune_cache import Tuner, interpreting
from .pdl import allow_next_kernel, pdl_args, wait_for_previous_kernel

MAX_ROWS = 8  # the GEMV serves up to this many rows; the backend sends more rows to dequantize + cuBLAS


def slot_bits(bits: int) -> int:
    """Width of the slot a `bits`-bit value takes in a word of the kernel layout: `bits`, or 4 for 3-bit values
    (three words hold 32 of them; see `unit_rows`)."""
    return 4 if bits == 3 else bits


def unit_rows(bits: int) -> int:
    """Input rows of one unit, the whole words the kernels read together per column: 32 / bits rows in one word,
    or for 3-bit values 32 rows in three words."""
    return 32 if bits == 3 else 32 // bits


def unit_words(bits: int) -> int:
    """int32 words of one unit (`unit_rows`) per column."""
    return unit_rows(bits) * bits // 32


def word_slot(row: int, bits: int) -> int:
    """Where row `row` (0 <= row < 32 / slot_bits) of a word sits in the kernel layout, in slots of
    `slot_bits(bits)` bits: rows 2p and 2p+1 at slots p and 16 / slot_bits + p (bit offsets slot_bits*p and
    16 + slot_bits*p). For 3 bits this is the layout of the four words the GEMV builds from each unit of three."""
    slot = slot_bits(bits)
    return (row % 2) * (16 // slot) + row // 2


def unpack_offsets(bits: int) -> tuple[int, ...]:
    """Bit offsets inside a 16-bit half at which the GEMV unpacks a value in place, without a shift: 1024 + q *
    2**offset must stay an exact fp16 (q << offset below bit 10); the values above bit 7 are shifted down by 8."""
    return tuple(range(0, 8, slot_bits(bits)))


def _dequant_pair_asm(bits: int, offset: int) -> str:
    """PTX for the weight pair (q - zero) * 2**-bits on two fp16 lanes, the pair's values at bit `offset` of each
    half of the word. Operands: $0 out, $1 the word, $2 -(2**(10 - bits - offset) + zero * 2**-bits) in both
    halves (`_neg_zero_asm`) (all .b32). One pair serves every row of activations (`_PAIR_MUL_ADD_ASM`)."""
    mask = (((1 << bits) - 1) << offset) * 0x10001
    step = ((15 - bits - offset) << 10) * 0x10001  # fp16 2**-(bits + offset) in both halves
    return (
        "{ .reg .b32 t, s;\n"
        f"lop3.b32 t, $1, {mask:#010x}, 0x64006400, 0xea;\n"  # (word & mask) | 0x6400: 1024 + q * 2**offset
        f"mov.b32 s, {step:#010x};\n"
        "fma.rn.f16x2 $0, t, s, $2; }"  # q * 2**-bits + 2**(10-bits-offset) - that - zero * 2**-bits, exact
    )


# acc2 + x2 * w2 on two fp16 lanes: $0 out, $1 the weight pair, $2 the activation pair, $3 acc2 in
_PAIR_MUL_ADD_ASM = tl.constexpr("fma.rn.f16x2 $0, $1, $2, $3;")


def _neg_zero_asm(bits: int, offset: int) -> str:
    """PTX for -(2**(10 - bits - offset) + zero * 2**-bits) in both fp16 halves (the addend `_pair_fma_asm`
    takes; exact), from $1 the scale/zero word (the fp16 zero point in the high half); $0 out (.b32)."""
    mul = (0x8000 | (15 - bits) << 10) * 0x10001  # fp16 -2**-bits
    add = (0x8000 | (25 - bits - offset) << 10) * 0x10001  # fp16 -2**(10 - bits - offset)
    return ("{ .reg .b32 z, m, a;\n"
            "prmt.b32 z, $1, 0, 0x3232;\n"  # the high half in both halves
            f"mov.b32 m, {mul:#010x};\n mov.b32 a, {add:#010x};\n"
            "fma.rn.f16x2 $0, z, m, a; }")


def _vector_load_asm(words: int) -> str:
    """PTX loading `words` consecutive 32-bit words ($0..) from one aligned global address (the last operand)."""
    outs = ", ".join(f"${i}" for i in range(words))
    return f"ld.global.v{words}.b32 {{{outs}}}, [${words}];"


# f16x2 -> the fp32 sum of its two lanes
_PAIR_SUM_ASM = ("{ .reg .f16 lo, hi; .reg .f32 a, b;\n mov.b32 {lo, hi}, $1;\n"
                 " cvt.f32.f16 a, lo;\n cvt.f32.f16 b, hi;\n add.f32 $0, a, b; }")


def asm_arguments(bits: int, emulate: bool) -> dict:
    """The `_gemv_kernel` arguments holding its PTX (empty under the interpreter, which runs none)."""
    if emulate:
        return dict(DEQUANT=(), NEG_ZERO=(), PAIR_SUM="", X_LOAD="")
    offsets = unpack_offsets(bits)
    return dict(DEQUANT=tuple(_dequant_pair_asm(bits, o) for o in offsets),
                NEG_ZERO=tuple(_neg_zero_asm(bits, o) for o in offsets),
                PAIR_SUM=_PAIR_SUM_ASM, X_LOAD=_vector_load_asm(min(4, 16 // slot_bits(bits))))


@triton.jit
def _fp16_halves(pairs):
    """fp32 (low, high) of int32 words holding two fp16 values (an activation pair; a scale and a zero point)."""
    low = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _x_pair(x16_ptr, x32_ptr, perm_ptr, offs_m, offs_kw, mask, stride_xm, p,
            PER_WORD: tl.constexpr, HAS_PERM: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_KW, 1]: the fp16 activations of rows 2p and 2p+1 of each word (low, high half)."""
    if HAS_PERM:
        k = offs_kw * PER_WORD + 2 * p
        low = tl.load(x16_ptr + offs_m * stride_xm + tl.load(perm_ptr + k, mask=mask, other=0), mask=mask, other=0)
        high = tl.load(x16_ptr + offs_m * stride_xm + tl.load(perm_ptr + k + 1, mask=mask, other=0),
                       mask=mask, other=0)
        return (low.to(tl.int32) & 0xFFFF) | (high.to(tl.int32) << 16)
    else:
        return tl.load(x32_ptr + offs_m * (stride_xm // 2) + offs_kw * (PER_WORD // 2) + p, mask=mask, other=0)


@triton.jit
def _x_vector(x32_ptr, rows, offs_kw, stride_xm, first, X_LOAD: tl.constexpr, PAIRS: tl.constexpr,
              COUNT: tl.constexpr):
    """COUNT int32 [BLOCK_M, BLOCK_KW, 1]: activation pairs first.. of each word, from one vector load per word
    (alignment: see quant_gemv). Not pure: the loads must stay after the wait for the kernel that writes x."""
    ptrs = x32_ptr + rows * (stride_xm // 2) + offs_kw * PAIRS + first
    if COUNT == 4:
        return tl.inline_asm_elementwise(X_LOAD, "=r,=r,=r,=r,l", [ptrs],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)
    else:
        return tl.inline_asm_elementwise(X_LOAD, "=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32), is_pure=False,
                                         pack=1)


@triton.jit
def _products_zero(packed, offs_m, EMULATE: tl.constexpr):
    """The empty sum of `_word_products` for words like `packed`, [BLOCK_M, BLOCK_KW, BLOCK_N]: fp32 zeros under
    EMULATE, else int32 words holding fp16 +0.0 in both halves."""
    if EMULATE:
        return tl.zeros_like(packed.to(tl.float32)) * tl.zeros_like(offs_m.to(tl.float32))
    else:
        return tl.zeros_like(packed) + tl.zeros_like(offs_m)


@triton.jit
def _products_sum(acc, PAIR_SUM: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_KW, BLOCK_N]: the value of a `_word_products` sum (the two fp16 lanes added)."""
    if EMULATE:
        return acc
    else:
        return tl.inline_asm_elementwise(PAIR_SUM, "=f,r", [acc], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _word_products(acc, packed, scale_zero, x16_ptr, x32_ptr, perm_ptr, offs_m, rows_x, offs_kw, mask_x, stride_xm,
                   BITS: tl.constexpr, HAS_PERM: tl.constexpr, VECTOR_X: tl.constexpr, DEQUANT: tl.constexpr,
                   NEG_ZERO: tl.constexpr, X_LOAD: tl.constexpr, EMULATE: tl.constexpr):
    """acc plus x * (q - zero) * 2**-BITS for each row of each word, [BLOCK_M, BLOCK_KW, BLOCK_N]: in fp32 under
    EMULATE, else in two fp16 lanes of an int32 (`_products_zero` starts a sum, `_products_sum` ends it; one sum
    takes at most 8 products a lane, so that fp16 rounding stays small).

    packed: int32 [1, BLOCK_KW, BLOCK_N] words in kernel layout (`word_slot`), values in slots of SLOT bits (for
    3 bits, 4-bit slots whose top bit is ignored); offs_kw: their word indices, word w holding input rows
    w * 32 / SLOT...; scale_zero: int32 [1, 1, BLOCK_N].
    VECTOR_X: the activations of each word come in vector loads from rows `rows_x` (every word of the block is
    in range); otherwise pair by pair, masked by mask_x.
    """
    SLOT: tl.constexpr = 4 if BITS == 3 else BITS  # slot_bits
    PER_WORD: tl.constexpr = 32 // SLOT
    PAIRS: tl.constexpr = PER_WORD // 2
    MASK: tl.constexpr = (1 << BITS) - 1
    STEP: tl.constexpr = 1.0 / (1 << BITS)
    if EMULATE:  # the interpreter runs no PTX: the same sum in fp32
        zero = _fp16_halves(scale_zero)[1]
        for p in tl.static_range(PAIRS):
            x_low, x_high = _fp16_halves(_x_pair(x16_ptr, x32_ptr, perm_ptr, offs_m, offs_kw, mask_x, stride_xm, p,
                                                 PER_WORD, HAS_PERM))
            halves = packed >> (SLOT * p)
            acc += x_low * (((halves & MASK).to(tl.float32) - zero) * STEP)
            acc += x_high * ((((halves >> 16) & MASK).to(tl.float32) - zero) * STEP)
        return acc
    else:
        VECTOR: tl.constexpr = 4 if PAIRS >= 4 else PAIRS
        for p in tl.static_range(PAIRS):
            if VECTOR_X:
                if p % VECTOR == 0:
                    xs = _x_vector(x32_ptr, rows_x, offs_kw, stride_xm, p, X_LOAD, PAIRS, VECTOR)
                x2 = xs[p % VECTOR]
            else:
                x2 = _x_pair(x16_ptr, x32_ptr, perm_ptr, offs_m, offs_kw, mask_x, stride_xm, p, PER_WORD, HAS_PERM)
            neg_zero = tl.inline_asm_elementwise(NEG_ZERO[(SLOT * p) % 8 // SLOT], "=r,r", [scale_zero],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            # pair p sits at bit SLOT*p of each half: unpacked in place below bit 8 (`unpack_offsets`), else
            # after a shift by 8 (the same shifted word for all pairs above). Unpacked once on the words'
            # [1, BLOCK_KW, BLOCK_N], then one multiply-add per row: with many rows (a server's decode batch)
            # unpacking per row made the kernel's cost grow with the rows.
            w2 = tl.inline_asm_elementwise(DEQUANT[(SLOT * p) % 8 // SLOT], "=r,r,r",
                                           [packed >> ((SLOT * p) // 8 * 8), neg_zero],
                                           dtype=tl.int32, is_pure=True, pack=1)
            acc = tl.inline_asm_elementwise(_PAIR_MUL_ADD_ASM, "=r,r,r,r", [w2, x2, acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
        return acc


@triton.jit
def _load_words(qweight_ptr, kw0, kw_end, offs_w, offs_n, mask_n, N, WORD: tl.constexpr, UNIT_WORDS: tl.constexpr,
                EVEN_K: tl.constexpr):
    """Word WORD of each unit kw0 + offs_w: int32 [1, BLOCK_KW, BLOCK_N], zeros past unit kw_end. EVEN_K: kw_end is
    a whole number of blocks, so one comparison masks the block."""
    offs_kw = kw0 + offs_w
    # EVEN_K: the block's test against kw_end, as a block-shaped tensor (a scalar mask fails in the interpreter)
    in_k = (kw0 + 0 * offs_w < kw_end) if EVEN_K else (offs_kw < kw_end)
    return tl.load(qweight_ptr + (offs_kw * UNIT_WORDS + WORD) * N + offs_n, mask=in_k & mask_n, other=0)


@triton.jit
def _load_scale_zero(scale_zero_ptr, kw0, kw_end, offs_n, mask_n, N, group_shift, UNIT_ROWS: tl.constexpr):
    """The scale/zero words [1, 1, BLOCK_N] of unit kw0's group (past kw_end: those of the last unit, a harmless
    valid read)."""
    group_row = ((tl.minimum(kw0, kw_end - 1) * UNIT_ROWS) >> group_shift) * N
    return tl.load(scale_zero_ptr + group_row + offs_n, mask=mask_n, other=0)


@triton.jit
def _fourth_word(w0, w1, w2):
    """The fourth word of a 3-bit unit in 4-bit slots: bit b of its value in slot s is bit 3 of slot s of word b
    (the other bits of each slot are left as they fall: the unpacking masks them)."""
    return ((w0 >> 3) & 0x11111111) | ((w1 >> 2) & 0x22222222) | ((w2 >> 1) & 0x44444444)


@triton.jit
def _gemv_kernel(
    x16_ptr, x32_ptr, qweight_ptr, scale_zero_ptr, perm_ptr, out_ptr, workspace_ptr, tickets_ptr,
    M, N, K, group_shift, split_k, stride_xm, stride_om,
    BITS: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr, VECTOR_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
    DEQUANT: tl.constexpr, NEG_ZERO: tl.constexpr, PAIR_SUM: tl.constexpr, X_LOAD: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, perm[k]] * scale[g, n] * (q[k, n] - zero[g, n]), g = k >> group_shift.

    x16 / x32: the same fp16 activations [M, K_in] viewed as int16 / int32, row stride stride_xm (in fp16
    elements, even), unit column stride.
    qweight: int32 [K * BITS / 32, N] in units (`unit_rows`) of whole words along K. 2, 4, 8 bits: one word of
    32 / BITS values per unit, row r of a word at slot `word_slot(r, BITS)`. 3 bits: three consecutive words per
    unit of 32 rows, each holding in the low 3 bits of its eight 4-bit slots the values of rows 8w..8w+7 (word
    w, slots as `word_slot(r, 3)`) and in the top bit of each slot one bit of a value of rows 24..31: the kernel
    builds those as a fourth word (`_fourth_word`) and reads all four as 4-bit words holding 3-bit values.
    scale_zero: int32 [n_groups, N], the fp16 scale in the low half and the fp16 full zero point (stored zero +
    offset) in the high half: one word, in the same layout as qweight's, per group and column.
    perm: int32 [K] (only when HAS_PERM): row k of qweight multiplies input feature perm[k].
    out: [M, N] fp16/bf16/fp32, row stride stride_om. workspace: fp32 [>= M * N], zero on entry and exit.
    tickets: int32 [>= cdiv(N, BLOCK_N)], zero on entry and exit.
    DEQUANT, NEG_ZERO, PAIR_SUM, X_LOAD: the PTX snippets, from `asm_arguments` (unused when EMULATE).
    PDL: see quant_kernels.pdl.
    EVEN_K: the units K / unit_rows are a whole number of blocks. VECTOR_X (needs EVEN_K, no perm): x's rows
    start 16-byte aligned and each word's activations are read in vector loads.
    Assumes K % unit_rows == 0, M <= BLOCK_M, and that a block of BLOCK_KW units lies in one group
    (BLOCK_KW * unit_rows divides 2**group_shift). Grid: (cdiv(N, BLOCK_N), split_k).
    Every tensor is 3-D [rows, units, columns] from the start so no value changes layout inside the loop.
    """
    UNIT_ROWS: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # unit_rows
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_m = tl.arange(0, BLOCK_M)[:, None, None]
    offs_w = tl.arange(0, BLOCK_KW)[None, :, None]
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    mask_m = offs_m < M
    rows_x = tl.minimum(offs_m, M - 1)  # rows past M compute on row M - 1 and are never stored
    mask_n = offs_n < N

    units = K // UNIT_ROWS
    units_per_split = tl.cdiv(tl.cdiv(units, split_k), BLOCK_KW) * BLOCK_KW
    kw_begin = pid_k * units_per_split
    kw_end = tl.minimum(kw_begin + units_per_split, units)

    allow_next_kernel(PDL)
    # Software pipeline: the words and scales of block i+1 are in flight while block i is computed; block 0 is
    # loaded before waiting for the kernel that writes x (weights are never written while decoding).
    acc = tl.zeros([BLOCK_M, 1, BLOCK_N], dtype=tl.float32)
    if BITS == 3:  # three words per unit, read as four 4-bit words
        w0 = _load_words(qweight_ptr, kw_begin, kw_end, offs_w, offs_n, mask_n, N, 0, 3, EVEN_K)
        w1 = _load_words(qweight_ptr, kw_begin, kw_end, offs_w, offs_n, mask_n, N, 1, 3, EVEN_K)
        w2 = _load_words(qweight_ptr, kw_begin, kw_end, offs_w, offs_n, mask_n, N, 2, 3, EVEN_K)
        scale_zero = _load_scale_zero(scale_zero_ptr, kw_begin, kw_end, offs_n, mask_n, N, group_shift, UNIT_ROWS)
        wait_for_previous_kernel(PDL)
        for kw0 in range(kw_begin, kw_end, BLOCK_KW):
            next_w0 = _load_words(qweight_ptr, kw0 + BLOCK_KW, kw_end, offs_w, offs_n, mask_n, N, 0, 3, EVEN_K)
            next_w1 = _load_words(qweight_ptr, kw0 + BLOCK_KW, kw_end, offs_w, offs_n, mask_n, N, 1, 3, EVEN_K)
            next_w2 = _load_words(qweight_ptr, kw0 + BLOCK_KW, kw_end, offs_w, offs_n, mask_n, N, 2, 3, EVEN_K)
            next_scale_zero = _load_scale_zero(scale_zero_ptr, kw0 + BLOCK_KW, kw_end, offs_n, mask_n, N,
                                               group_shift, UNIT_ROWS)
            scale = _fp16_halves(scale_zero)[0]
            mask_x = mask_m & (kw0 + offs_w < kw_end)
            word = (kw0 + offs_w) * 4  # index of the unit's first 4-bit word (8 input rows each)
            # two words a sum: 8 products a lane, as for 2-bit words (half the conversions to fp32 of one a sum)
            acc2 = _word_products(_products_zero(w0, offs_m, EMULATE), w0, scale_zero, x16_ptr, x32_ptr, perm_ptr,
                                  offs_m, rows_x, word, mask_x, stride_xm, BITS, HAS_PERM, VECTOR_X, DEQUANT,
                                  NEG_ZERO, X_LOAD, EMULATE)
            acc2 = _word_products(acc2, w1, scale_zero, x16_ptr, x32_ptr, perm_ptr, offs_m, rows_x, word + 1, mask_x,
                                  stride_xm, BITS, HAS_PERM, VECTOR_X, DEQUANT, NEG_ZERO, X_LOAD, EMULATE)
            dot = _products_sum(acc2, PAIR_SUM, EMULATE)
            acc2 = _word_products(_products_zero(w0, offs_m, EMULATE), w2, scale_zero, x16_ptr, x32_ptr, perm_ptr,
                                  offs_m, rows_x, word + 2, mask_x, stride_xm, BITS, HAS_PERM, VECTOR_X, DEQUANT,
                                  NEG_ZERO, X_LOAD, EMULATE)
            acc2 = _word_products(acc2, _fourth_word(w0, w1, w2), scale_zero, x16_ptr, x32_ptr, perm_ptr, offs_m,
                                  rows_x, word + 3, mask_x, stride_xm, BITS, HAS_PERM, VECTOR_X, DEQUANT, NEG_ZERO,
                                  X_LOAD, EMULATE)
            dot += _products_sum(acc2, PAIR_SUM, EMULATE)
            acc += (scale * (1 << BITS)) * tl.sum(dot, axis=1, keep_dims=True)
            w0, w1, w2, scale_zero = next_w0, next_w1, next_w2, next_scale_zero
    else:
        packed = _load_words(qweight_ptr, kw_begin, kw_end, offs_w, offs_n, mask_n, N, 0, 1, EVEN_K)
        scale_zero = _load_scale_zero(scale_zero_ptr, kw_begin, kw_end, offs_n, mask_n, N, group_shift, UNIT_ROWS)
        wait_for_previous_kernel(PDL)
        for kw0 in range(kw_begin, kw_end, BLOCK_KW):
            next_packed = _load_words(qweight_ptr, kw0 + BLOCK_KW, kw_end, offs_w, offs_n, mask_n, N, 0, 1, EVEN_K)
            next_scale_zero = _load_scale_zero(scale_zero_ptr, kw0 + BLOCK_KW, kw_end, offs_n, mask_n, N,
                                               group_shift, UNIT_ROWS)
            scale = _fp16_halves(scale_zero)[0]
            acc2 = _word_products(_products_zero(packed, offs_m, EMULATE), packed, scale_zero, x16_ptr, x32_ptr,
                                  perm_ptr, offs_m, rows_x, kw0 + offs_w, mask_m & (kw0 + offs_w < kw_end), stride_xm,
                                  BITS, HAS_PERM, VECTOR_X, DEQUANT, NEG_ZERO, X_LOAD, EMULATE)
            dot = _products_sum(acc2, PAIR_SUM, EMULATE)
            acc += (scale * (1 << BITS)) * tl.sum(dot, axis=1, keep_dims=True)
            packed, scale_zero = next_packed, next_scale_zero

    mask_out = mask_m & mask_n
    out_ptrs = out_ptr + offs_m * stride_om + offs_n
    if split_k == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        partial_ptrs = workspace_ptr + offs_m * N + offs_n
        # relaxed adds need no round trip each; the barrier (every thread's adds issued) and the ticket's acq_rel
        # (release is cumulative over what the barrier ordered before it) are meant to put them all before the
        # ticket. Open: an intermittent 100-row error of the few-row kernel on an H200 (BENCHMARKS.md, 2026-12-01)
        tl.atomic_add(partial_ptrs, acc, mask=mask_out, sem="relaxed")
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel")
        if ticket == split_k - 1:
            # .cg reads through L2: the other programs' partials are not in this SM's L1.
            total = tl.load(partial_ptrs, mask=mask_out, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.store(partial_ptrs, tl.zeros_like(acc), mask=mask_out)
            tl.store(tickets_ptr + pid_n, 0)


def block_units(block_kw: int, bits: int, group_shift: int, rows: int) -> int:
    """Units (`unit_rows`) per block of a launch with configuration BLOCK_KW and `rows` rows: at most 16 words a
    thread for one row, fewer for more rows (bounded accumulators); for 3 bits half as many units as BLOCK_KW
    (each unit is three words, four unpacked); never more than one group."""
    units = min(block_kw, 16 // triton.next_power_of_2(rows))
    if bits == 3:
        units = max(1, units // 2)
    return max(1, min(units, (1 << min(group_shift, 30)) // unit_rows(bits)))


def _fits(config: dict, key: tuple) -> bool:
    """Pruner (key: N, K, bits, ...; one row): every split gets at least one block of units (as large as groups
    of all rows allow); between half a program and 32 programs per SM."""
    n, k, bits = key[:3]
    units = block_units(config["BLOCK_KW"], bits, 31, 1)
    if k // unit_rows(bits) < config["SPLIT_K"] * units or units * unit_words(bits) > 16:
        return False  # (3-bit blocks of 8 units, 24 words a thread, spill registers on sm_90)
    programs = triton.cdiv(n, config["BLOCK_N"]) * config["SPLIT_K"]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    return sms // 2 <= programs <= 32 * sms


# One 16-byte load per thread and word row: BLOCK_N = 4 words x 32 threads x num_warps. Any other width makes
# Triton pick different register layouts for the int32 words and the fp16 output, and every iteration then
# shuffles values through shared memory. Decode is latency bound at these sizes: the best configurations split
# K so finely that each program runs one or two iterations with all its loads in flight at once.
GEMV_TUNER = Tuner(
    "gemv2",  # renamed when the kernel changes enough to move its best configurations: they are tuned again
    [dict(BLOCK_N=128 * warps, num_warps=warps, BLOCK_KW=block_kw, SPLIT_K=split_k)
     for warps, block_kw, split_k in itertools.product([2, 4, 8], [2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64, 128])],
    prune=_fits,
    interpreter_config=dict(BLOCK_N=64, BLOCK_KW=8, SPLIT_K=2, num_warps=4),
)


class Workspace:
    """Zeroed fp32 partial sums and int32 tickets for split-K, one pair per device, grown on demand.

    Call `reserve` outside CUDA-graph capture (the backend does it in `prepare`) so a launch never allocates.
    """

    _buffers: dict = {}

    @classmethod
    def reserve(cls, device: torch.device, partials: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = cls._buffers.get(device)
        if have is None or have[0].numel() < partials or have[1].numel() < tickets:
            partials = max(partials, have[0].numel() if have else 0)
            tickets = max(tickets, have[1].numel() if have else 0)
            have = (torch.zeros(partials, dtype=torch.float32, device=device),
                    torch.zeros(tickets, dtype=torch.int32, device=device))
            cls._buffers[device] = have
        return have


def gemv_workspace_size(n: int) -> tuple[int, int]:
    """(fp32 partials, int32 tickets) that any GEMV launch on N output columns may touch."""
    return MAX_ROWS * n, triton.cdiv(n, 16)


def quant_gemv(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor,
               perm: torch.Tensor | None, bits: int, group_shift: int,
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """y = x @ W for x [M, K] (M <= MAX_ROWS, unit column stride), W the GPTQ weight [K, N]; returns [M, N] in x.dtype.

    The product runs in fp16 (x of another dtype is converted first; |x| must stay below the fp16 range).

    Tensors as in `_gemv_kernel`; groups hold 2**group_shift rows (at least one unit, `unit_rows`).
    `out` ([M, N], unit column stride) receives the result if given. `config` forces one launch configuration
    (tests); otherwise the tuned one for this shape is used.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert m <= MAX_ROWS, f"quant_gemv serves at most {MAX_ROWS} rows, got {m}"
    assert x.stride(1) == 1 and k * bits == qweight.shape[0] * 32, "x must be [M, K] with unit column stride"
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # The kernel reads fp16 activations as int32 pairs, and each word's in vector loads of up to 16 bytes: rows
    # must start at such a boundary (else they are copied: fresh storage is aligned, and a row is whole words).
    x16 = x if x.dtype == torch.float16 else x.to(torch.float16)
    vector_bytes = 4 * min(4, 16 // slot_bits(bits))
    if (x16.stride(0) * 2) % vector_bytes or x16.data_ptr() % vector_bytes:
        x16 = x16.clone(memory_format=torch.contiguous_format)
    workspace, tickets = Workspace.reserve(x.device, *gemv_workspace_size(n))
    emulate = interpreting()
    asm = asm_arguments(bits, emulate)

    def launch(cfg: dict, rows: int = m) -> None:
        rows_block = triton.next_power_of_2(rows)
        block_kw = block_units(cfg["BLOCK_KW"], bits, group_shift, rows)
        even_k = (k // unit_rows(bits)) % block_kw == 0
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _gemv_kernel[grid](
            x16.view(torch.int16), x16.view(torch.int32), qweight, scale_zero,
            perm if perm is not None else qweight, out, workspace, tickets,
            rows, n, k, group_shift, cfg["SPLIT_K"], x16.stride(0), out.stride(0),
            BITS=bits, HAS_PERM=perm is not None, EVEN_K=even_k, VECTOR_X=even_k and perm is None and not emulate,
            BLOCK_M=rows_block, BLOCK_KW=block_kw, BLOCK_N=cfg["BLOCK_N"], EMULATE=emulate, **asm,
            num_warps=cfg["num_warps"], **pdl_args(x.device),
        )

    # Every row count uses the configuration tuned for one row (the decode step's, tuned when the model loads):
    # tuning each row count apart stalled the first short prompt of a session by seconds per layer shape.
    key = (n, k, bits, group_shift, perm is not None)
    launch(config or GEMV_TUNER.pick(key, lambda cfg: launch(cfg, rows=1)))
    return out
