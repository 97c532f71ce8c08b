"""talis bench: its floor arithmetic and shape table against the anchors (shared/notes/anchors.md), and the
random GPTQ layers it builds."""

import pytest
import torch

from quant_kernels import gptq_format
from talis_cli import bench
from talis_cli.errors import UsageError

# anchors.md, LLaMA 4-bit g128, fp16 lm_head, vocab 32000: linear params (B), 4-bit weight bytes with scales and
# zeros (GB), KV per token (MB), bytes per token at context 128 (GB)
ANCHORS = {
    "7B": (6.48, 3.36, 0.52, 3.69),
    "13B": (12.69, 6.59, 0.82, 7.02),
    "33B": (32.10, 16.68, 1.60, 17.31),
    "65B": (64.76, 33.64, 2.62, 34.50),
}


@pytest.mark.parametrize("name", ANCHORS)
def test_floor_matches_anchor_table(name):
    params_b, weight_gb, kv_mb, total_gb = ANCHORS[name]
    args = bench.shape_args(name, 256)
    params = sum(k * n for k, n in bench.linear_shapes(args)) * args.n_layers
    assert params / 1e9 == pytest.approx(params_b, abs=0.006)
    at_128 = bench.floor_bytes(args, bits=4, group_size=128, context=128)
    assert (at_128["weights"] + at_128["scales_zeros"]) / 1e9 == pytest.approx(weight_gb, abs=0.006)
    per_token_kv = bench.floor_bytes(args, 4, 128, context=1)["kv"]
    assert per_token_kv / 1e6 == pytest.approx(kv_mb, abs=0.006)
    assert at_128["total"] / 1e9 == pytest.approx(total_gb, abs=0.006)


def test_floor_fp16_7b_and_65b_context_2048():
    args = bench.shape_args("7B", 256)
    fp16 = bench.floor_bytes(args, bits=16, group_size=-1, context=128)
    assert fp16["scales_zeros"] == 0
    assert fp16["total"] / 1e9 == pytest.approx(13.3, abs=0.05)  # anchors: fp16 7B reads 13.3 GB per token
    big = bench.floor_bytes(bench.shape_args("65B", 2048), 4, 128, context=2048)
    assert big["total"] / 1e9 == pytest.approx(39.5, abs=0.1)  # anchors: 65B at 2048 needs at least 39.5 GB


def test_floor_counts_a_quantized_head_and_only_the_sliding_window():
    import dataclasses

    args = bench.shape_args("7B", 4096)
    head = bench.gptq_bytes(bench.QuantLinear(args.dim, args.vocab_size, 4, 128, device="meta"))
    plain = bench.floor_bytes(args, 4, 128, context=2048)
    quantized = bench.floor_bytes(args, 4, 128, context=2048, head_bytes=head)
    assert plain["lm_head"] == 2 * args.vocab_size * args.dim
    assert quantized["total"] == pytest.approx(plain["total"] - plain["lm_head"] + head)
    assert head < plain["lm_head"] / 3  # 4-bit codes and g128 scales/zeros against fp16
    windowed = dataclasses.replace(args, sliding_window=256)
    assert bench.floor_bytes(windowed, 4, 128, context=2048)["kv"] == bench.floor_bytes(args, 4, 128, context=256)["kv"]
    assert bench.floor_bytes(windowed, 4, 128, context=100)["kv"] == bench.floor_bytes(args, 4, 128, context=100)["kv"]


def test_group_size_minus_one_has_one_group_per_column():
    args = bench.shape_args("7B", 256)
    per_column = bench.floor_bytes(args, 4, -1, 0)["scales_zeros"]
    columns = sum(n for _, n in bench.linear_shapes(args)) * args.n_layers
    assert per_column == pytest.approx(columns * (2 + 0.5))


@pytest.mark.parametrize("name,heads,kv_heads,vocab", [("70B", 64, 8, 128256), ("8B", 32, 8, 128256),
                                                        ("33B", 52, 52, 32000)])
def test_shape_table(name, heads, kv_heads, vocab):
    args = bench.shape_args(name.lower(), 512)
    assert (args.n_heads, args.n_kv_heads, args.vocab_size, args.head_dim) == (heads, kv_heads, vocab, 128)
    q_out, kv_out = heads * 128, kv_heads * 128
    assert bench.linear_shapes(args)[0] == (args.dim, q_out + 2 * kv_out)
    assert args.max_position_embeddings >= 512


def test_unknown_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="7B"):
        bench.shape_args("7b-chat", 128)


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_random_quant_linear_is_symmetric_and_keeps_spread(bits):
    torch.manual_seed(bits)
    layer = bench.random_quant_linear(512, 384, bits, 128, act_order=True, device="cpu")
    zeros = gptq_format.unpack_cols(layer.qzeros, bits, 384) + layer.zero_offset
    assert (zeros == 2 ** (bits - 1)).all()
    assert sorted(layer.g_idx.tolist()) == sorted(gptq_format.default_g_idx(512, 128).tolist())
    assert not torch.equal(layer.g_idx, gptq_format.default_g_idx(512, 128))
    codes = gptq_format.unpack_rows(layer.qweight, bits, 512).float()
    assert codes.mean().item() == pytest.approx((2 ** bits - 1) / 2, rel=0.05)
    x = torch.randn(64, 512)
    y = x.half().float() @ layer.dequantized_weight().float().t()
    assert 0.7 < y.std().item() < 1.5  # scales chosen so each layer roughly keeps unit spread


def test_unsupported_bits_are_a_usage_error():
    with pytest.raises(UsageError, match=r"^--bits 5 is not supported; use one of 2, 3, 4, 8$"):
        bench.run_bench(shape="7B", bits=5)


def test_run_bench_needs_a_gpu_or_a_clear_choice():
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="exactly one"):
            bench.run_bench()
    else:
        with pytest.raises(Exception, match="CUDA GPU"):
            bench.run_bench(shape="7B")


def test_report_printer_lists_every_variant():
    rows = [dict(variant=v, decode_tok_s=100.0 * i, pct_floor=50.0, prefill_tok_s=1e4, ttft_ms=12.0,
                 bytes_per_token_gb=3.7, peak_vram_gb=4.0, ms_per_token=10 / (i + 1)) for i, v in enumerate("ab")]
    rows[1].update(prefill_tok_s=None, prefill_error="OutOfResources: shared memory")
    rows[0].update(prefill_graph_ms=8.0, memory_gb={"build": [35.5, 36.01], "decode": [38.42, 38.7]})
    rows.append(dict(variant="c", error="not here"))
    report = dict(shape="7B", bits=4, group_size=128, act_order=False, prompt=128, gen=128, ctx=256, device="X",
                  torch="2", copy_tb_s=3.0, rows=rows, notes=["n1"])
    text = bench.format_report(report)
    for line in ("unavailable: not here", "note: n1", "b prefill failed: OutOfResources",
                 "a: prefill as a CUDA graph 16000 tok/s, TTFT 8.0 ms",
                 "a: GB allocated / peak so far after build 35.50 / 36.01, decode 38.42 / 38.70"):
        assert line in text
    table = text.split("\n")[4:6]
    assert [float(line.split()[1]) for line in table] == [0.0, 100.0] and "failed" in table[1]


@pytest.mark.parametrize("kwargs, words", [
    ({"shape": "9Z"}, "unknown shape '9Z'; choose one of 7B"),
    ({}, "give exactly one of --shape (7B, 13B, ...) or --model DIR"),
    ({"shape": "7B", "prompt": 64, "gen": 64, "ctx": 100}, "--ctx 100 is smaller than --prompt + --gen (128)"),
])
def test_usage_errors_come_before_the_gpu_check(kwargs, words):
    """A mistyped command is a usage error (exit 2) on any machine, not "needs a CUDA GPU" on a CPU."""
    with pytest.raises(UsageError) as caught:
        bench.run_bench(**kwargs)
    assert str(caught.value).startswith(words)
