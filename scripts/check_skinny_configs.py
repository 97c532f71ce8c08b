"""Check every launch configuration the few-row tensor-core kernel's tuner may pick against a float32 reference,
at one layer shape and row count (a tuned choice that is wrong shows up here, not only when the tuner picks it).

    PYTHONPATH=. python3 scripts/check_skinny_configs.py [--k 4096] [--n 11008] [--rows 100] [--bits 4]
                                                         [--group-size 128] [--act-order]

Prints each configuration's relative error (tests/test_triton_kernels.py's measure, tolerance 1e-3) and exits 1
if any is above the tolerance.
"""
import argparse
import sys

import torch

from quant_kernels import gptq_format
from quant_kernels.triton_backend import prepare_weight
from quant_kernels.triton_skinny import SKINNY_TUNER, quant_skinny, skinny_key
from tests.test_triton_kernels import TOLERANCE, random_layer, random_x, relative_error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("k", 4096), ("n", 11008), ("rows", 100), ("bits", 4), ("group-size", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--act-order", action="store_true")
    opts = parser.parse_args()
    layer = random_layer(opts.k, opts.n, opts.bits, opts.group_size, opts.act_order)
    weight = prepare_weight(layer)
    dense = gptq_format.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, opts.bits, 1).float()
    x = random_x(opts.rows, opts.k, seed=opts.rows)
    reference = x.float() @ dense
    key = skinny_key(opts.rows, opts.n, opts.k, opts.bits, weight.group_shift)
    worst = 0.0
    for config in (c for c in SKINNY_TUNER.configs if SKINNY_TUNER.prune(c, key)):
        error = relative_error(quant_skinny(x, *weight.args(), config=config), reference)
        worst = max(worst, error)
        print(f"{error:.2e} {'BAD ' if error >= TOLERANCE else 'ok  '} {config}")
    # the tuner's own path: the call that tunes (and returns its chosen launch's output), then a cached choice
    for call in ("tuning call", "cached choice"):
        out = torch.full((opts.rows, opts.n), float("nan"), dtype=torch.float16, device=x.device)
        error = relative_error(quant_skinny(x, *weight.args(), out=out), reference)
        worst = max(worst, error)
        print(f"{error:.2e} {'BAD ' if error >= TOLERANCE else 'ok  '} {call}: {SKINNY_TUNER._chosen.get(repr(key))}")
    return 1 if worst >= TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
