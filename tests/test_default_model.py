"""The embedded default model: quantizer quality on held-out text, and the shipped tokenizer.

GPTQ and RTN 4-bit g128 are made here from the committed fp16 model (tests/data/kjv/fp16) and
compared on the held-out books (tests/data/kjv/heldout.txt), which the model never saw in training.
"""

from pathlib import Path

import pytest
import torch

from talis_cli.engine import DEFAULT_MODEL_DIR, Engine, LoadSettings
from talis_cli.perplexity import perplexity
from talis_cli.tokenizer import load_tokenizer
from talis_cli.quantize import quantize_model

DATA = Path(__file__).parent / "data" / "kjv"
FP16_DIR = DATA / "fp16"
CTX, WINDOWS = 512, 8  # a short evaluation: a second or two per model on 2 cores
CALIB_SAMPLES, CALIB_SEQLEN = 32, 256  # less than the build script's 128 x 512, to stay quick


def load(model_dir: Path) -> Engine:
    return Engine.load(LoadSettings(model_dir=model_dir, device_map="cpu", backend="torch"))


def heldout_text() -> str:
    return (DATA / "heldout.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Engine]:
    out = tmp_path_factory.mktemp("kjv")
    quantize_model(FP16_DIR, out / "gptq", bits=4, group_size=128, act_order=True, method="gptq",
                   calib_file=DATA / "calib.txt", nsamples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN, device="cpu")
    quantize_model(FP16_DIR, out / "rtn", bits=4, group_size=128, method="rtn", device="cpu")
    dirs = {"fp16": FP16_DIR, "gptq": out / "gptq", "rtn": out / "rtn", "shipped": DEFAULT_MODEL_DIR}
    return {name: load(folder) for name, folder in dirs.items()}


@pytest.fixture(scope="module")
def perplexities(engines) -> dict[str, float]:
    text = heldout_text()
    return {name: perplexity(engine, text, ctx=CTX, max_windows=WINDOWS) for name, engine in engines.items()}


def heldout_log_probs(engine: Engine) -> torch.Tensor:
    """float32 [WINDOWS * CTX, vocab]: next-token log-probabilities on consecutive held-out windows."""
    ids = torch.tensor(engine.encode(heldout_text(), add_bos=False)[: WINDOWS * CTX]).view(WINDOWS, CTX)
    engine.model.clear_cache()
    with torch.no_grad():
        return torch.log_softmax(engine.model(ids), dim=-1).flatten(0, 1)


def test_heldout_perplexity_orders_fp16_gptq_rtn(perplexities):
    assert perplexities["fp16"] < perplexities["gptq"] < perplexities["rtn"], perplexities


def test_gptq_output_is_closer_to_fp16_than_rtn(engines):
    reference = heldout_log_probs(engines["fp16"])

    def kl_from_fp16(name: str) -> float:  # mean per token
        return torch.nn.functional.kl_div(heldout_log_probs(engines[name]), reference, log_target=True,
                                          reduction="batchmean").item()

    gptq, rtn = kl_from_fp16("gptq"), kl_from_fp16("rtn")
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_shipped_model_is_a_faithful_4bit_copy(perplexities):
    assert (DEFAULT_MODEL_DIR / "quantize_config.json").is_file()
    assert perplexities["shipped"] < perplexities["rtn"], perplexities
    assert perplexities["shipped"] == pytest.approx(perplexities["fp16"], rel=0.01), perplexities


@pytest.mark.parametrize("text", [
    "And God said, Let there be light: and there was light.",
    "  two leading spaces,\ttabs and\n\nblank lines  ",
    "emoji 🙂🕊️ and other scripts: 日本語, Ελληνικά, עברית, ÄÖÜ ß",
])
def test_shipped_tokenizer_round_trips(text):
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-fallback pieces must be ordinary vocabulary, or skip_special_tokens would drop them.
    assert not set(ids[1:]) & set(tokenizer.all_special_ids)
