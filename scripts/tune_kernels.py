"""Tune the Triton GEMV for model shapes on this GPU; with --write-table, merge the choices into the table that
ships with the package (quant_kernels/tuned_configs.json), so a fresh machine with this GPU loads without tuning.

    PYTHONPATH=. python3 scripts/tune_kernels.py [--shapes 7B,13B,70B] [--bits 4,3] [--group-size 128]
        [--act-order no|yes|both] [--model DIR|default ...] [--write-table] [--json FILE]
    PYTHONPATH=. python3 scripts/tune_kernels.py --merge FILE   # a run's --json into the table (no GPU needed)

On the lent GPU machine the checkout is a copy: write the choices under $OUT with --json there, and --merge the
fetched file into the table here, then commit it.

Every choice is timed here, from scratch: this machine's cache (TALIS_CACHE_DIR) and the shipped table are
ignored for the run. Each linear shape runs at 1, 16, 32, 64 and 128 rows, which tunes every kernel that has a
tuner: the GEMV (one row: the decode step; its choice serves up to 2 rows) and the tensor-core kernel of 3-128
rows (a server's decode batch, a short prompt's prefill; tiles of 16, 32, 64 and 128 rows). A
named shape gives one decoder layer's linears as the fast path runs them (q/k/v and gate/up fused); `--model`
loads a folder (`default`: the embedded model) on the GPU and takes each distinct linear of it, with its own bits,
groups and act-order. Prints one line per choice.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="", help="comma-separated LLaMA shapes (talis bench's names)")
    parser.add_argument("--bits", default="4", help="comma-separated bit widths for --shapes")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--model", action="append", default=[], help="a GPTQ model folder, or `default`")
    parser.add_argument("--write-table", action="store_true", help="merge the choices into the shipped table")
    parser.add_argument("--json", type=Path, help="also write the choices to this file")
    parser.add_argument("--merge", type=Path, help="merge this file of choices (a run's --json) into the table")
    parser.add_argument("--scratch", type=Path, help="keep the run's own tuning cache in this folder (default: a "
                        "temporary one): a run cut short by a time limit leaves there what it had tuned")
    opts = parser.parse_args(argv)
    if not opts.shapes and not opts.model and not opts.merge:
        parser.error("name --shapes, --model or --merge")
    return opts


ROWS = (1, 16, 32, 64, 128)  # rows per call: the decode GEMV, then each tile height of the tensor-core kernel


def tune_layer(layer, device) -> None:
    """Call `layer` (a QuantLinear on the Triton backend) at each of ROWS rows of random fp16 input on `device`:
    each call tunes the key it reaches."""
    import torch

    with torch.inference_mode():
        for rows in ROWS:
            layer(torch.randn(rows, layer.in_features, dtype=torch.float16, device=device))


def tune_shapes(shapes: list[str], bits: list[int], group_size: int, act_orders: list[bool]) -> None:
    """Tune the linears of one decoder layer of each named shape (random weights on the GPU), at each bit width
    and act-order."""
    import torch

    from talis_cli.bench import linear_shapes, random_quant_linear, shape_args

    for shape in shapes:
        args = shape_args(shape, 2048)
        for b in bits:
            for act_order in act_orders:
                for k, n in linear_shapes(args):
                    layer = random_quant_linear(k, n, b, group_size, act_order, "cuda")
                    layer.set_backend("triton", keep_source=False)
                    tune_layer(layer, "cuda")
                    del layer
                    torch.cuda.empty_cache()


def tune_models(folders: list[str]) -> None:
    """Tune each distinct linear the Triton kernels run in each model folder (`default`: the embedded model),
    loaded on the GPU."""
    import torch

    from quant_kernels.quant_linear import QuantLinear
    from quant_kernels.triton_backend import PreparedWeight
    from talis_cli.engine import Engine, LoadSettings

    for folder in folders:
        engine = Engine.load(LoadSettings(model_dir=None if folder == "default" else folder, device_map="auto"))
        seen = set()
        for module in engine.model.modules():
            state = getattr(module, "backend_state", None)
            if not isinstance(module, QuantLinear) or not isinstance(state, PreparedWeight):
                continue  # layers the Triton kernels do not run have nothing to tune
            key = (module.in_features, module.out_features, state.bits, state.group_shift, state.perm is not None)
            if key not in seen:
                seen.add(key)
                tune_layer(module, state.qweight.device)
        del engine
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.merge:
        from quant_kernels.autotune_cache import write_table

        try:
            sections = json.loads(opts.merge.read_text())
        except (OSError, ValueError) as error:
            print(f"cannot read {opts.merge}: {error}; pass the file a tuning run wrote with --json", file=sys.stderr)
            return 1
        path = write_table(sections)
        print(f"merged {sum(map(len, sections.values()))} choices into {path}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("tune_kernels.py needs a CUDA GPU (the choices are timings of this GPU); run it on the GPU machine",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        if opts.scratch:
            opts.scratch.mkdir(parents=True, exist_ok=True)
            scratch = str(opts.scratch)
        os.environ["TALIS_CACHE_DIR"] = scratch  # read at each lookup: nothing of earlier runs is reused
        os.environ["TALIS_TUNED_TABLE"] = "0"
        from quant_kernels.autotune_cache import cache_path, write_table

        tune_shapes([s for s in opts.shapes.split(",") if s], [int(b) for b in opts.bits.split(",")],
                    opts.group_size, {"no": [False], "yes": [True], "both": [False, True]}[opts.act_order])
        tune_models(opts.model)
        sections = json.loads(cache_path().read_text()) if cache_path().exists() else {}
    for section, choices in sorted(sections.items()):
        for key, config in sorted(choices.items()):
            print(f"{section}  {key}  {json.dumps(config, sort_keys=True)}")
    if opts.json:
        opts.json.write_text(json.dumps(sections, indent=1, sort_keys=True) + "\n")
    if opts.write_table:
        path = write_table(sections)
        print(f"merged {sum(map(len, sections.values()))} choices into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
