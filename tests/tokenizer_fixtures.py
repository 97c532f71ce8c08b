"""Tokenizers of the forms users have, built from the test text: a SentencePiece BPE model (LLaMA-1/2 style,
byte fallback), a byte-level BPE with Llama-3 / ChatML control tokens, and folders around them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tests.tiny_models import TOKENIZER_DIR

KJV_TEXT = Path(__file__).parent / "data" / "kjv" / "calib.txt"
LLAMA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False}
CHAT_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|im_start|>", "<|im_end|>"]


def train_sentencepiece(vocab_size: int = 4000, **options) -> bytes:
    """A SentencePiece BPE model trained on the test text with LLaMA's settings (well under a second)."""
    import sentencepiece as spm

    settings = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                    minloglevel=2)
    settings.update(options)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(KJV_TEXT), model_writer=model, vocab_size=vocab_size, **settings)
    return model.getvalue()


def write_sentencepiece_folder(folder: Path, model: bytes, config: dict | None = None) -> Path:
    """tokenizer.model + tokenizer_config.json, as LLaMA-1/2 folders of 2023 hold them (no tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA_CONFIG if config is None else config))
    return folder


def write_byte_level_folder(folder: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE (Llama-3 / Qwen style) whose Llama-3 and ChatML markers are special added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(KJV_TEXT)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                      eos_token="<|end_of_text|>")
    wrapped.save_pretrained(str(folder))
    return folder


def kjv_tokenizer_dir() -> Path:
    return TOKENIZER_DIR


def write_tiny_model(folder: Path, vocab_size: int, seed: int = 0) -> Path:
    """A one-layer fp16 LLaMA with random weights and no tokenizer files (add them, or pass --tokenizer)."""
    from tests.tiny_models import TOKENIZER_FILES, hf_model, save_fp16

    model = hf_model(seed=seed, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
    save_fp16(model, folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder
