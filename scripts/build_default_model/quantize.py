"""Quantize the fp16 default model with talis' own quantizer and measure held-out perplexity.

Makes GPTQ 4-bit g128 act-order (calibrated on tests/data/kjv/calib.txt) and RTN 4-bit g128
under the build folder, prints the held-out perplexity of fp16, GPTQ and RTN as a Markdown
table (the numbers in MODEL_CARD.md), then installs the GPTQ files into talis_cli/default_model
(MODEL_CARD.md there is kept). Runs on CPU in about a minute:
    PYTHONPATH=. python3 scripts/build_default_model/quantize.py
"""

import argparse
import shutil
from pathlib import Path

from talis_cli.engine import Engine, LoadSettings
from talis_cli.perplexity import perplexity
from talis_cli.quantize import quantize_model

ROOT = Path(__file__).resolve().parents[2]
QUANT_SETTINGS = dict(bits=4, group_size=128)
CALIB_SAMPLES, CALIB_SEQLEN = 128, 512
PPL_CTX = 512
CARD = "MODEL_CARD.md"


def quantize_both(fp16_dir: Path, calib: Path, build: Path) -> dict[str, Path]:
    """{"gptq": folder, "rtn": folder}, freshly made under `build`."""
    out = {"gptq": build / "gptq-4bit-g128", "rtn": build / "rtn-4bit-g128"}
    for folder in out.values():
        shutil.rmtree(folder, ignore_errors=True)
    quantize_model(fp16_dir, out["gptq"], **QUANT_SETTINGS, act_order=True, method="gptq",
                   calib_file=calib, nsamples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN, device="cpu")
    quantize_model(fp16_dir, out["rtn"], **QUANT_SETTINGS, method="rtn", device="cpu")
    return out


def heldout_perplexity(model_dir: Path, text: str) -> float:
    engine = Engine.load(LoadSettings(model_dir=model_dir, device_map="cpu", backend="torch"))
    return perplexity(engine, text, ctx=PPL_CTX)


def install(gptq_dir: Path, target: Path) -> None:
    """Replace everything in `target` but the model card by the GPTQ folder's files."""
    target.mkdir(parents=True, exist_ok=True)
    for path in target.iterdir():
        if path.name != CARD:
            path.unlink()
    for path in gptq_dir.iterdir():
        shutil.copy(path, target / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp16", type=Path, default=ROOT / "tests/data/kjv/fp16")
    parser.add_argument("--calib", type=Path, default=ROOT / "tests/data/kjv/calib.txt")
    parser.add_argument("--heldout", type=Path, default=ROOT / "tests/data/kjv/heldout.txt")
    parser.add_argument("--build", type=Path, default=ROOT / "scripts/build_default_model/build")
    parser.add_argument("--target", type=Path, default=ROOT / "talis_cli/default_model")
    args = parser.parse_args()

    made = quantize_both(args.fp16, args.calib, args.build)
    text = args.heldout.read_text(encoding="utf-8")
    rows = {"fp16": args.fp16, "GPTQ 4-bit g128 act-order": made["gptq"], "RTN 4-bit g128": made["rtn"]}
    print(f"| model | held-out perplexity (ctx {PPL_CTX}) |\n|---|---|")
    for name, folder in rows.items():
        print(f"| {name} | {heldout_perplexity(folder, text):.3f} |", flush=True)
    install(made["gptq"], args.target)
    size = sum(p.stat().st_size for p in args.target.iterdir())
    print(f"installed {args.target} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
