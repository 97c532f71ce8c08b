"""Train the default model's tokenizer: a SentencePiece-style byte-fallback BPE.

Spaces become the metaspace "▁" and every text gets one "▁" in front (the decoder strips it
again), so encode/decode round-trips any text exactly, leading and repeated spaces included.
Newlines are tokens of their own. Characters outside the vocabulary fall back to the 256 byte
tokens <0x00>..<0xFF>, which are ordinary vocabulary (ids 3..258), not added special tokens,
so decoding with skip_special_tokens=True keeps them. <unk>, <s>, </s> are ids 0, 1, 2;
encoding with special tokens prepends <s>.

Saves tokenizer.json and tokenizer_config.json into --out, loadable offline with
transformers.AutoTokenizer.from_pretrained(out).
"""

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
METASPACE = "▁"


def build_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Attach normalizer, pre-tokenizer, decoder and BOS post-processor to a BPE tokenizer."""
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(METASPACE), normalizers.Replace(" ", METASPACE)]
    )
    # Merges never cross a word start or a newline.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Split(METASPACE, behavior="merged_with_next"),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(METASPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def train_bpe(text_file: Path, vocab_size: int) -> Tokenizer:
    """Learn merges on the text, then lay out the vocabulary as specials, bytes, learned pieces."""
    learner = build_pipeline(Tokenizer(models.BPE(unk_token="<unk>")))
    learner.train(
        [str(text_file)],
        BpeTrainer(vocab_size=vocab_size - len(SPECIALS) - len(BYTE_TOKENS), show_progress=False),
    )
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = {piece: i for i, piece in enumerate(SPECIALS + BYTE_TOKENS + pieces)}
    assert len(vocab) == vocab_size, "a learned piece collides with a special or byte token"
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.add_special_tokens(SPECIALS)
    return build_pipeline(tokenizer)


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=root / "scripts/build_default_model/build/train.txt")
    parser.add_argument("--out", type=Path, default=root / "tests/data/kjv/fp16")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512, help="the model's context")
    args = parser.parse_args()

    tokenizer = train_bpe(args.text, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    config = json.dumps(tokenizer_config(args.max_length), indent=2)
    (args.out / "tokenizer_config.json").write_text(config + "\n")
    text = args.text.read_text(encoding="utf-8")
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    print(f"{args.out}: vocab {tokenizer.get_vocab_size()}, "
          f"{n_tokens} training tokens ({len(text) / n_tokens:.2f} chars/token)")


if __name__ == "__main__":
    main()
