"""Triton GPTQ kernels against the reference (gptq_format.dequantize, then an fp32 matmul).

Without a GPU the kernels run under TRITON_INTERPRET=1 at small shapes; with one, the same tests run on it and
the tests marked gpu add real LLaMA shapes.
"""
import pytest
import torch

from quant_kernels import gptq_format
from quant_kernels.autotune_cache import Tuner
from quant_kernels.quant_linear import QuantLinear
from quant_kernels.triton_backend import (GEMV_PASSES, Fallback, PreparedWeight, TritonBackend, forward_gathered,
                                          group_order, input_gather, pack_3bit_units, prepare_weight)
from quant_kernels.triton_gemm import dequantize_into, quant_gemm
from quant_kernels.triton_gemv import MAX_ROWS, Workspace, quant_gemv
from quant_kernels.triton_skinny import MAX_SKINNY_ROWS, quant_skinny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu(test):
    """Mark a test as needing a CUDA GPU (skipped without one)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


TOLERANCE = 1e-3  # relative error in fp16


def random_layer(in_features: int, out_features: int, bits: int, group_size: int, act_order: bool,
                 zero_offset: int = 1, seed: int = 0) -> QuantLinear:
    """A QuantLinear with random codes, zeros and scales; act-order draws a random row order of the groups."""
    gen = torch.Generator().manual_seed(seed)
    groups = gptq_format.num_groups(in_features, group_size)
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=gen)
    zeros = torch.randint(0, 2**bits - zero_offset, (groups, out_features), generator=gen)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.002).half()
    g_idx = gptq_format.default_g_idx(in_features, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    layer = QuantLinear.from_quantized(gptq_format.pack_rows(q, bits), gptq_format.pack_cols(zeros, bits), scales,
                                       g_idx, bits, group_size, zero_offset)
    return layer.to(DEVICE)


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ the dequantized weight, in fp32."""
    weight = gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits,
                                    layer.zero_offset)
    return x.float() @ weight.float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output (an element left unwritten?)"
    return ((out.float() - ref).norm() / ref.norm()).item()


def poisoned(rows: int, cols: int) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), dtype=torch.float16, device=DEVICE)


def random_x(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen).half().to(DEVICE)


# K = 200 and 264 are not multiples of the interpreter's K block (64 words); N = 80 is not a multiple of BLOCK_N;
# N = 90 is not a whole number of packed zero words. 3 bits: K = 288 is 9 units of 32 rows (blocks of 4 units);
# groups of 32 rows are one unit a block; N = 45 is odd.
SMALL_CASES = [
    # rows, K, N, bits, group_size, act_order
    (1, 256, 64, 4, 128, False),
    (1, 200, 80, 4, 8, True),
    (3, 256, 64, 4, 32, True),
    (7, 264, 96, 4, -1, False),
    (1, 256, 64, 8, 32, False),
    (3, 512, 64, 8, 128, True),
    (7, 128, 64, 8, -1, True),
    (1, 256, 64, 2, 128, True),
    (5, 512, 32, 2, 32, False),
    (2, 256, 90, 4, 64, False),
    (1, 256, 64, 3, 128, False),
    (3, 288, 45, 3, 32, True),
    (8, 256, 80, 3, -1, True),
]


@pytest.mark.parametrize("rows,k,n,bits,group_size,act_order", SMALL_CASES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_matches_reference(rows, k, n, bits, group_size, act_order, split_k):
    layer = random_layer(k, n, bits, group_size, act_order, seed=rows * 7 + bits)
    weight = prepare_weight(layer)
    x = random_x(rows, k, seed=split_k)
    out = poisoned(rows, n)
    config = dict(BLOCK_N=64, BLOCK_KW=8, SPLIT_K=split_k, num_warps=4)
    quant_gemv(x, *weight.args(), out=out, config=config)
    assert relative_error(out, reference(layer, x)) < TOLERANCE


def test_every_row_count_uses_the_one_row_tuning(monkeypatch):
    """A short prompt (2-8 rows) must not trigger tuning of its own: the decode step's one-row choice serves it."""
    layer = random_layer(256, 64, 4, 128, act_order=False)
    weight = prepare_weight(layer)
    keys = []

    def pick(key, launch):
        keys.append(key)
        return dict(BLOCK_N=64, BLOCK_KW=8, SPLIT_K=2, num_warps=4)

    monkeypatch.setattr("quant_kernels.triton_gemv.GEMV_TUNER.pick", pick)
    for rows in (1, 5):
        x = random_x(rows, 256, seed=rows)
        assert relative_error(quant_gemv(x, *weight.args()), reference(layer, x)) < TOLERANCE
    assert len(keys) == 2 and keys[0] == keys[1]


def test_gemv_split_k_leaves_workspace_clean():
    layer = random_layer(512, 128, 4, 32, act_order=False)
    weight = prepare_weight(layer)
    config = dict(BLOCK_N=64, BLOCK_KW=8, SPLIT_K=4, num_warps=4)
    for seed in range(2):  # a dirty workspace would corrupt the second call
        x = random_x(3, 512, seed)
        out = quant_gemv(x, *weight.args(), config=config)
        assert relative_error(out, reference(layer, x)) < TOLERANCE
    partials, tickets = Workspace.reserve(torch.device(DEVICE), 0, 0)
    assert not partials.any() and not tickets.any()


# N = 80 is not a whole number of 32-column blocks; 17-32 rows take BLOCK_M 32. With BLOCK_K 32 every K tile is
# whole (K is a multiple of 32): test_skinny_masks_a_k_tile_that_runs_past_k covers a partial one.
SKINNY_CASES = [
    # rows, K, N, bits, group_size, act_order
    (9, 256, 64, 4, 128, False),
    (16, 288, 80, 4, 32, True),
    (17, 256, 64, 8, 32, True),
    (32, 512, 96, 2, 64, False),
    (2, 256, 64, 4, -1, False),
    (24, 224, 64, 8, -1, False),
]
# a short prompt's prefill: BLOCK_M 64 and 128
SKINNY_PREFILL_CASES = [(40, 256, 96, 4, 128, True), (100, 288, 64, 8, 32, False), (128, 256, 80, 2, 64, False)]


@pytest.mark.parametrize("rows,k,n,bits,group_size,act_order,split_k",
                         [case + (split_k,) for case in SKINNY_CASES for split_k in (1, 3)]
                         + [case + (split_k,) for case in SKINNY_PREFILL_CASES for split_k in (1, 2)])
def test_skinny_matches_reference(rows, k, n, bits, group_size, act_order, split_k):
    layer = random_layer(k, n, bits, group_size, act_order, seed=rows * 5 + bits)
    weight = prepare_weight(layer)
    x = random_x(rows, k, seed=split_k)
    out = poisoned(rows, n)
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split_k, num_warps=4, num_stages=1)
    quant_skinny(x, *weight.args(), out=out, config=config)
    assert relative_error(out, reference(layer, x)) < TOLERANCE


@pytest.mark.parametrize("rows,split_k", [(5, 1), (5, 2), (128, 2)])
def test_skinny_masks_a_k_tile_that_runs_past_k(rows, split_k):
    """K = 288 in 64-row tiles: the last tile of K (and of the last split) is half outside the weight, so the masks
    on words and on x columns inside a tile decide the result; 5 rows scale the tile's product, 128 every weight."""
    layer = random_layer(288, 80, 4, 128, act_order=False, seed=rows + split_k)
    weight = prepare_weight(layer)
    x = random_x(rows, 288, seed=rows)
    out = poisoned(rows, 80)
    config = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=split_k, num_warps=4, num_stages=1)
    quant_skinny(x, *weight.args(), out=out, config=config)
    assert relative_error(out, reference(layer, x)) < TOLERANCE


def test_skinny_split_k_leaves_workspace_clean_and_refuses_3_bits():
    layer = random_layer(512, 128, 4, 64, act_order=False)
    weight = prepare_weight(layer)
    config = dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=1)
    for seed in range(2):  # a dirty workspace or ticket would corrupt the second call
        x = random_x(12, 512, seed)
        assert relative_error(quant_skinny(x, *weight.args(), config=config), reference(layer, x)) < TOLERANCE
    partials, tickets = Workspace.reserve(torch.device(DEVICE), 0, 0)
    assert not partials.any() and not tickets.any()
    three = prepare_weight(random_layer(256, 64, 3, 128, act_order=False))
    with pytest.raises(ValueError, match="3 bits"):
        quant_skinny(random_x(9, 256, 0), *three.args())
    with pytest.raises(ValueError, match=f"{MAX_SKINNY_ROWS + 1} rows"):
        quant_skinny(random_x(MAX_SKINNY_ROWS + 1, 512, 0), *weight.args())


@pytest.mark.parametrize("rows,k,n,bits,group_size,act_order", [
    (33, 200, 80, 4, 8, True), (9, 256, 64, 4, 128, False), (17, 264, 64, 8, -1, True), (40, 256, 96, 2, 32, False),
    (12, 224, 72, 3, 32, True),
])
def test_gemm_matches_reference(rows, k, n, bits, group_size, act_order):
    layer = random_layer(k, n, bits, group_size, act_order, seed=rows)
    x = random_x(rows, k, seed=rows + 1)
    out = poisoned(rows, n)
    quant_gemm(x, *prepare_weight(layer).args(), out=out,
               config=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1))
    assert relative_error(out, reference(layer, x)) < TOLERANCE


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (8, -1, False), (2, 128, True), (3, 32, True),
                                                       (3, -1, False)])
def test_dequantize_into_matches_reference_exactly(bits, group_size, act_order):
    layer = random_layer(256, 96, bits, group_size, act_order, zero_offset=0)
    dense = dequantize_into(poisoned(256, 96), *prepare_weight(layer).args())
    expected = gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 0)
    assert torch.equal(dense, expected)


def test_dequantize_into_a_column_slice_is_that_slice_of_the_weight():
    layer = random_layer(256, 300, 4, 32, act_order=True, zero_offset=0)
    whole = dequantize_into(poisoned(256, 300), *prepare_weight(layer).args())
    part = dequantize_into(poisoned(256, 44), *prepare_weight(layer).args(), first_column=256)
    assert torch.equal(part, whole[:, 256:])


def test_prefill_dequantizes_wide_layers_in_column_slices(monkeypatch):
    """More rows than the GEMV serves: dequantize + matmul slice by slice (three here, the last one narrower)."""
    from quant_kernels.triton_backend import Scratch

    monkeypatch.setattr(Scratch, "SLICE_ELEMENTS", 256 * 128)
    assert [(c.start, c.stop) for c in Scratch.column_slices(256, 300)] == [(0, 128), (128, 256), (256, 300)]
    layer = random_layer(256, 300, 4, 64, act_order=True, seed=3)
    layer.set_backend("triton")
    x = random_x(GEMV_PASSES * MAX_ROWS + 3, 256, seed=3)
    assert relative_error(layer(x), reference(layer, x)) < TOLERANCE


@pytest.mark.parametrize("rows", [MAX_ROWS + 1, 19, GEMV_PASSES * MAX_ROWS, GEMV_PASSES * MAX_ROWS + 1])
def test_rows_beyond_one_gemv_match_reference_plain_and_gathered(rows):
    """A decode batch of more rows than one GEMV takes (GEMV passes, then dequantize + matmul), through forward
    and through forward_gathered (the act-order input already in the kernels' order), with a bias."""
    layer = random_layer(256, 96, 4, 32, act_order=True, seed=rows)
    layer.bias = torch.randn(96, generator=torch.Generator().manual_seed(rows)).to(DEVICE, torch.float16)
    layer.set_backend("triton")
    x = random_x(rows, 256, seed=rows)
    expected = reference(layer, x) + layer.bias.float()
    assert relative_error(layer(x), expected) < TOLERANCE
    gathered = x[:, input_gather(layer).long()]
    assert relative_error(forward_gathered(layer, gathered), expected) < TOLERANCE


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, True), (2, 32, False), (8, -1, True), (3, 64, True)])
def test_repacking_in_column_slices_gives_the_layout_of_one_piece(monkeypatch, bits, group_size, act_order):
    """prepare_weight repacks wide layers slice by slice (to bound the memory it needs while loading); an odd
    slice width must give the same kernel layout as the whole layer at once."""
    import quant_kernels.triton_backend as backend

    layer = random_layer(256, 300, bits, group_size, act_order, seed=5)
    monkeypatch.setattr(backend, "REPACK_COLUMNS", 10**6)
    whole = prepare_weight(layer)
    monkeypatch.setattr(backend, "REPACK_COLUMNS", 7)
    sliced = prepare_weight(layer)
    assert torch.equal(sliced.qweight, whole.qweight) and torch.equal(sliced.scale_zero, whole.scale_zero)


def _fp16_fma(a: int, b: int, c: int) -> int:
    """PTX fma.rn.f16x2 on the bits of three f16x2 words (the product and sum exact in float64, one rounding)."""
    import numpy as np

    halves = lambda w: np.array([w & 0xFFFF, w >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
    out = (halves(a) * halves(b) + halves(c)).astype(np.float16).view(np.uint16)
    return int(out[0]) | int(out[1]) << 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpacking_constants_give_exact_weights(bits):
    """The GEMV's PTX constants (`asm_arguments`), applied as PTX would: for every value q at every in-place offset
    of a slot (other bits of the word set, as a 3-bit slot's top bit is), and every zero point z,
    (q - z) * 2**-bits exactly in both fp16 lanes. Runs without a GPU; the kernels themselves are checked by the
    tests marked gpu."""
    import re

    from quant_kernels.triton_gemv import asm_arguments, slot_bits, unpack_offsets

    asm = asm_arguments(bits, emulate=False)
    assert len(asm["DEQUANT"]) == len(unpack_offsets(bits)) == 8 // slot_bits(bits)
    for offset, dequant, neg_zero in zip(unpack_offsets(bits), asm["DEQUANT"], asm["NEG_ZERO"]):
        mask = int(re.search(r"lop3\.b32 t, \$1, (0x[0-9a-f]+), 0x64006400, 0xea;", dequant).group(1), 16)
        step = int(re.search(r"mov\.b32 s, (0x[0-9a-f]+);", dequant).group(1), 16)
        mul, add = (int(v, 16) for v in re.search(r"mov\.b32 m, (0x[0-9a-f]+);\s*mov\.b32 a, (0x[0-9a-f]+);",
                                                  neg_zero).groups())
        others = ~(((1 << bits) - 1) << offset) & 0xFFFF  # every bit of the half but the value's
        for z in range(2**bits + 1):  # full zero points: stored zero + 1 (format v1) reaches 2**bits
            z16 = int(torch.tensor(float(z), dtype=torch.float16).view(torch.int16)) & 0xFFFF
            addend = _fp16_fma(z16 * 0x10001, mul, add)  # prmt puts the zero point (high half) in both lanes
            for q in range(2**bits):
                half = q << offset | others
                word = (half | half << 16) & mask | 0x64006400  # lop3 (a & b) | c
                weight = _fp16_fma(word, step, addend)
                want = int(torch.tensor((q - z) / 2**bits, dtype=torch.float16).view(torch.int16)) & 0xFFFF
                assert weight == want * 0x10001, f"q={q} z={z} offset={offset}"


def test_group_order_sorts_rows_by_group():
    g_idx = torch.arange(96, dtype=torch.int32) // 32
    assert group_order(g_idx, 32) is None
    shuffled = g_idx[torch.randperm(96)]
    perm = group_order(shuffled, 32)
    assert torch.equal(shuffled[perm.long()], g_idx)
    with pytest.raises(ValueError):
        group_order(torch.cat([torch.zeros(40), torch.ones(56)]).int(), 32)


@pytest.mark.parametrize("rows", [1, 6, 19])
@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False), (3, True)])
def test_backend_matches_torch_backend(rows, bits, act_order):
    """Through QuantLinear: the Triton kernels (GEMV up to 8 rows, dequantize + matmul above) for every bit width."""
    layer = random_layer(256, 64, bits, 64, act_order, seed=rows)
    x = random_x(rows, 256, seed=rows)[None]  # [1, rows, K]: QuantLinear flattens leading dims
    layer.set_backend("torch")
    expected = layer(x)
    layer.set_backend("triton")
    out = layer(x)
    assert out.shape == expected.shape == (1, rows, 64)
    assert isinstance(layer._state, PreparedWeight)
    assert relative_error(out[0], reference(layer, x[0])) < TOLERANCE


@pytest.mark.parametrize("in_features,group_size,reason", [
    (240, 64, "in_features not a multiple of 32 (3-bit values in whole int32 words)"),
    (256, 16, "groups smaller than 32 rows (3-bit values in whole int32 words)"),
])
def test_3bit_layers_the_kernels_cannot_run_fall_back_to_torch(in_features, group_size, reason):
    """3-bit values come in units of 32 rows (three int32 words): other layers keep the torch backend's result."""
    layer = random_layer(in_features, 48, 3, group_size, act_order=True, seed=2)
    x = random_x(3, in_features, seed=2)
    layer.set_backend("torch")
    expected = layer(x)
    layer.set_backend("triton", keep_source=False)
    assert isinstance(layer._state, Fallback) and layer._state.reason == reason
    assert not layer.source_released  # the fallback still reads the GPTQ tensors
    assert torch.equal(layer(x), expected)


def test_3bit_units_hold_rows_0_to_23_in_slots_and_rows_24_to_31_in_the_top_bits():
    """The kernel layout of 3-bit codes, read back bit by bit in plain Python (one unit of 32 rows, 2 columns)."""
    codes = torch.randint(0, 8, (32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    words = pack_3bit_units(codes)
    assert words.shape == (3, 2)
    for col in range(2):
        for w in range(3):
            word = int(words[w, col]) & 0xFFFFFFFF
            slots = [(word >> (4 * s)) & 0xF for s in range(8)]
            assert [v & 7 for v in slots] == codes[8 * w:8 * w + 8, col].tolist()
            assert [v >> 3 for v in slots] == [(int(c) >> w) & 1 for c in codes[24:, col]]


@pytest.mark.parametrize("bits", [4, 3])
def test_released_source_frees_gptq_tensors_when_the_backend_holds_the_weight(bits):
    layer = random_layer(256, 64, bits, 64, act_order=True, seed=bits)
    x = random_x(3, 256, seed=5)
    expected = reference(layer, x)
    layer.set_backend("triton", keep_source=False)
    assert layer.source_released
    assert relative_error(layer(x), expected) < TOLERANCE
    # g_idx too: the act-order input order lives in the backend's permutation (the result above used it)
    assert layer.qweight.numel() == layer.qzeros.numel() == layer.scales.numel() == layer.g_idx.numel() == 0
    with pytest.raises(RuntimeError, match="reload the model"):
        layer.set_backend("torch")
    layer.to(DEVICE)  # moving drops the prepared state, which cannot be rebuilt now
    with pytest.raises(RuntimeError, match="reload the model"):
        layer(x)


def test_tiny_3bit_gptq_model_gives_the_torch_backends_greedy_tokens(tmp_path, monkeypatch):
    """A 3-bit act-order GPTQ folder (tests/tiny_models.save_gptq), loaded by the engine: with every quantized
    layer on the Triton kernels (prefill of 10 tokens through dequantize + matmul, decode steps through the GEMV)
    greedy decoding picks the torch backend's tokens."""
    from talis_cli.engine import Engine, LoadSettings
    from tests.tiny_models import hf_model, save_gptq

    # One GEMV program per layer (under the interpreter a program costs the same whatever its size); no tuning.
    monkeypatch.setattr("quant_kernels.triton_gemv.GEMV_TUNER.pick",
                        lambda key, launch: dict(BLOCK_N=256, BLOCK_KW=8, SPLIT_K=1, num_warps=2))
    save_gptq(hf_model(seed=13, num_hidden_layers=1), tmp_path, bits=3, group_size=32, act_order=True)
    engine = Engine.load(LoadSettings(model_dir=tmp_path, device_map="cpu", backend="torch", max_seq_len=32))
    model = engine.model.to(DEVICE, torch.float16)  # as on a GPU: the kernels take fp16 scales
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 3 for m in layers)
    prompt = torch.randint(3, 4096, (1, 10), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def greedy(backend: str, new_tokens: int = 3) -> list[int]:
        for m in layers:
            m.set_backend(backend)
        model.setup_cache(1, 32)
        with torch.no_grad():
            tokens = [int(model(prompt, last_only=True)[0, -1].argmax())]
            for pos in range(10, 10 + new_tokens - 1):
                step = torch.tensor([tokens[-1:]], device=DEVICE)
                tokens.append(int(model(step, start_pos=pos)[0, -1].argmax()))
        return tokens

    expected = greedy("torch")
    assert greedy("triton") == expected
    assert all(isinstance(m.backend_state, PreparedWeight) for m in layers)


def test_weight_bytes_count_what_the_backend_holds():
    """`talis info` reports the weights as held: after the GPTQ tensors are freed, the backend's repacked copy."""
    from talis_cli.model_info import weight_bytes_in_memory

    layer = random_layer(256, 64, 4, 64, act_order=True)
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    gptq = nbytes(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
    layer.set_backend("torch_dense")
    assert weight_bytes_in_memory(layer) == gptq + nbytes(layer.backend_state)  # the dense copy counts too
    layer.set_backend("triton", keep_source=False)
    state = layer.backend_state
    assert weight_bytes_in_memory(layer) == nbytes(layer.g_idx, state.qweight, state.scale_zero, state.perm)


def test_unequal_groups_fall_back_to_torch():
    layer = random_layer(64, 32, 4, 32, act_order=False)
    layer.g_idx = torch.cat([torch.zeros(40), torch.ones(24)]).int().to(DEVICE)
    state = TritonBackend().prepare(layer)
    assert isinstance(state, Fallback) and "unequal" in state.reason
    x = random_x(2, 64, seed=3)
    assert relative_error(TritonBackend().forward(layer, state, x), reference(layer, x)) < TOLERANCE


def test_tuner_keeps_fastest_and_remembers_it_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TALIS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda *a: "test-gpu")
    times = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5}
    monkeypatch.setattr("quant_kernels.autotune_cache.graph_time_us", lambda fn, **kw: (fn(), times[launched[-1]])[1])
    launched = []
    configs = [dict(B=b) for b in times]
    # The pruner drops B=4 for this key, so B=2 is the fastest that remains.
    make = lambda: Tuner("t", configs, prune=lambda c, key: c["B"] < 4, interpreter_config=configs[0])  # noqa: E731
    assert make().pick((1, 2), lambda c: launched.append(c["B"])) == dict(B=2)
    launched.clear()
    assert make().pick((1, 2), lambda c: launched.append(c["B"])) == dict(B=2)
    assert launched == []  # the second tuner read the choice from disk and timed nothing


REAL_SHAPES = [(4096, 11008), (11008, 4096)]  # (K, N)


@gpu
@pytest.mark.parametrize("k,n", REAL_SHAPES)
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, 128, True), (8, -1, False),
                                                       (4, 32, True), (2, 64, False), (3, 128, False), (3, 128, True),
                                                       (3, 32, False)])
def test_real_shapes_on_gpu(k, n, bits, group_size, act_order):
    """Every path at LLaMA shapes, with fixed launch configurations (the timing script checks the tuned ones)."""
    layer = random_layer(k, n, bits, group_size, act_order)
    weight = prepare_weight(layer)
    dense = gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 1).float()
    for rows, split_k in ((1, 1), (1, 16), (3, 4), (8, 2)):
        x = random_x(rows, k, seed=rows)
        # 3-bit: the tuned configuration (fixed ones can need more shared memory than an H200 has; the tuner skips
        # those), so split-K varies only with the tuner's choice
        config = None if bits == 3 else dict(BLOCK_N=512, BLOCK_KW=2, SPLIT_K=split_k, num_warps=4)
        out = quant_gemv(x, *weight.args(), out=poisoned(rows, n), config=config)
        assert relative_error(out, x.float() @ dense) < TOLERANCE, f"gemv rows={rows} split_k={split_k}"
    for rows in ((9, 32, 40, 100) if bits != 3 else ()):  # the tensor-core kernel, tuned configuration
        x = random_x(rows, k, seed=rows)
        out = quant_skinny(x, *weight.args(), out=poisoned(rows, n))
        assert relative_error(out, x.float() @ dense) < TOLERANCE, f"skinny rows={rows}"
        # a fixed split-K tile besides the tuned one (which may not split)
        config = dict(BLOCK_N=128, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=3)
        out = quant_skinny(x, *weight.args(), out=poisoned(rows, n), config=config)
        assert relative_error(out, x.float() @ dense) < TOLERANCE, f"skinny rows={rows} split-K"
    for rows in (33, 300):
        x = random_x(rows, k, seed=rows)
        config = None if bits == 3 else dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
        out = quant_gemm(x, *weight.args(), out=poisoned(rows, n), config=config)
        assert relative_error(out, x.float() @ dense) < TOLERANCE, f"gemm rows={rows}"
    scratch = dequantize_into(torch.full((k, n), float("nan"), dtype=torch.float16, device=DEVICE), *weight.args())
    assert torch.equal(scratch, dense.half())
