"""The memory a `talis bench --shape` row should take, part by part (talis_cli.memory_breakdown), without a GPU.

    PYTHONPATH=. python3 scripts/memory_breakdown.py [--shape 65B] [--ctx 2048] [--kv int8] [--prompt 128] [--before]

--before: as the code stood before session 10 (g_idx kept after release, the L2-flush buffer held to the end of the
run, a cuBLAS workspace for a fresh side stream per capture). Defaults: gpu_check.py's kv65b spec.
"""
import argparse
import sys

from talis_cli.bench import shape_args
from talis_cli.memory_breakdown import format_table, parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="65B")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--kv", default="int8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--before", action="store_true")
    opts = parser.parse_args(argv)
    print(format_table(parts(shape_args(opts.shape, opts.ctx), opts.bits, opts.group_size, opts.ctx, opts.kv,
                             opts.prompt, opts.act_order, before=opts.before)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
