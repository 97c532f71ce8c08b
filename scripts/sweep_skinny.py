"""Time the few-row tensor-core kernel (quant_kernels/triton_skinny.py) over a wider launch space than its tuner's,
at a server's decode batch sizes, next to the one-row GEMV and the tuner's own pick, in one process.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/sweep_skinny.py [--shapes 7B] [--rows 8] [--top 5]

Per linear shape of one decoder layer (q/k/v and gate/up fused) and row count: the GEMV at one row (the step a
single stream runs), the tuner's pick (shipped table or tuned here), and every configuration of BLOCK_N x BLOCK_K x
SPLIT_K x num_warps x num_stages that the tuner's pruner admits; times from autotune_cache.graph_time_us (CUDA
graph, L2 emptied before each launch), weights rotated over copies larger than L2. The best configurations are
checked against a float32 reference (tests/test_triton_kernels.py's tolerance) before they are printed.
"""
import argparse

import torch

from quant_kernels import gptq_format
from quant_kernels.autotune_cache import generated_configs, graph_time_us
from quant_kernels.triton_backend import prepare_weight
from quant_kernels.triton_gemv import quant_gemv
from quant_kernels.triton_skinny import SKINNY_TUNER, quant_skinny, skinny_key
from scripts.gpu_kernels import MODELS, linear_shapes, quant_bytes, random_layer, rotating
from tests.test_triton_kernels import TOLERANCE

WIDE = generated_configs(BLOCK_N=[64, 128, 256], BLOCK_K=[64, 128], SPLIT_K=[1, 2, 4, 8, 16], num_warps=[4, 8],
                         num_stages=[2, 3, 4])


def timed(fn) -> float:
    fn()  # compile (and tune) first
    return graph_time_us(fn)


def sweep(model: str, name: str, k: int, n: int, rows: int, top: int) -> None:
    nbytes = quant_bytes(k, n, 4, 128)
    layers, next_layer = rotating(lambda: random_layer(k, n, 4, 128, False), nbytes)
    weights = {id(layer): prepare_weight(layer) for layer in layers}
    first = layers[0]
    dense = gptq_format.dequantize(first.qweight, first.qzeros, first.scales, first.g_idx, 4, 1).float()
    x1 = torch.randn(1, k, device="cuda", dtype=torch.float16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    shift = weights[id(first)].group_shift
    key = skinny_key(rows, n, k, 4, shift)

    def gemv():
        quant_gemv(x1, *weights[id(next_layer())].args())

    def skinny(config=None):
        return lambda: quant_skinny(x, *weights[id(next_layer())].args(), config=config)

    one_row = timed(gemv)
    picked = timed(skinny())
    pick = SKINNY_TUNER._chosen.get(repr(key))
    results = []
    for config in (c for c in WIDE if SKINNY_TUNER.prune(c, key)):
        try:
            results.append((timed(skinny(config)), config))
        except Exception as exc:  # noqa: BLE001  (out of shared memory or registers: skip the configuration)
            print(f"    skipped {config}: {type(exc).__name__}")
    results.sort(key=lambda r: r[0])
    tbs = lambda us: nbytes / us / 1e6  # noqa: E731
    print(f"{model} {name} K={k} N={n} rows={rows}: GEMV 1 row {one_row:.2f} us ({tbs(one_row):.2f} TB/s); "
          f"tuner's pick {picked:.2f} us ({tbs(picked):.2f} TB/s) {pick}")
    reference = x.float() @ dense
    for us, config in results[:top]:
        out = quant_skinny(x, *weights[id(first)].args(), config=config)
        error = ((out.float() - reference).norm() / reference.norm()).item()
        print(f"    {us:8.2f} us {tbs(us):.2f} TB/s  error {error:.1e}{' BAD' if error >= TOLERANCE else ''}  {config}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7B")
    parser.add_argument("--rows", default="8")
    parser.add_argument("--top", type=int, default=5)
    opts = parser.parse_args()
    for model in opts.shapes.split(","):
        for name, k, n in linear_shapes(*MODELS[model]):
            if name == "gate":  # the fast path runs gate and up fused
                continue
            for rows in (int(r) for r in opts.rows.split(",")):
                sweep(model, name, k, n, rows, opts.top)


if __name__ == "__main__":
    main()
