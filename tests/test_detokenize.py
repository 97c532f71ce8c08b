"""Incremental detokenization against full decodes, on tokenizers built here (nothing downloaded)."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from talis_cli.detokenize import IncrementalDetokenizer, special_ids_to_skip

CORPUS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Café, naïve façade, déjà vu; Straße und Übermut.",
    "The quick brown fox jumps over the lazy dog 12345.\nA second line.",
]
# Characters the tokenizers never saw: they fall back to bytes, split over several tokens.
UNSEEN = ["😀", "🎉", "中文", "ж", "€", "👩‍👩‍👧", "  ", "\n", "\t"]
SPECIALS = ["<unk>", "<s>", "</s>"]
KJV_TOKENIZER = Path(__file__).parent / "data" / "kjv" / "fp16"


def _wrap(tokenizer: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sentencepiece_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def sentencepiece_tokenizer():
    """LLaMA-1/2 style: metaspace words, byte-fallback tokens <0xNN> as ordinary vocabulary."""
    learner = _sentencepiece_pipeline(Tokenizer(models.BPE()))
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=150, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {piece: i for i, piece in enumerate(SPECIALS + byte_tokens + pieces)}
    merges = [tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(SPECIALS)
    return _wrap(_sentencepiece_pipeline(tokenizer))


def byte_level_tokenizer():
    """LLaMA-3 / GPT-2 style: byte-level BPE, a character's bytes may end up in different tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return _wrap(tokenizer)


def kjv_tokenizer():
    """The embedded model's own tokenizer, as saved in the repository."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(KJV_TOKENIZER)


BUILDERS = [sentencepiece_tokenizer, byte_level_tokenizer]
if (KJV_TOKENIZER / "tokenizer.json").exists():
    BUILDERS.append(kjv_tokenizer)


@pytest.fixture(scope="module", params=BUILDERS, ids=lambda b: b.__name__)
def tokenizer(request):
    return request.param()


def random_text(rng: random.Random, n_words: int) -> str:
    words = " ".join(CORPUS).split() + UNSEEN
    return "".join(rng.choice(words) + rng.choice([" ", " ", "", "\n", "  "]) for _ in range(n_words))


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def stream_text(detok: IncrementalDetokenizer, ids) -> tuple[str, list[str]]:
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    return "".join(deltas), deltas


@pytest.mark.parametrize("seed", range(6))
def test_stream_equals_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(random_text(rng, 30), add_special_tokens=False)
    assert any(tokenizer.decode([t]).count("\ufffd") for t in ids), "the text should split characters over tokens"
    text, deltas = stream_text(IncrementalDetokenizer(tokenizer), ids)
    assert text == decode(tokenizer, ids)
    # valid text never shows a half character on the way
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(4))
def test_continuation_of_a_prompt_keeps_leading_spaces(tokenizer, seed):
    rng = random.Random(100 + seed)
    prompt = tokenizer.encode(random_text(rng, 8).rstrip(), add_special_tokens=True)
    reply = tokenizer.encode(" " + random_text(rng, 12), add_special_tokens=False)
    text, _ = stream_text(IncrementalDetokenizer(tokenizer, prompt), reply)
    skip = special_ids_to_skip(tokenizer)
    full = decode(tokenizer, [t for t in prompt + reply if t not in skip])
    prompt_text = decode(tokenizer, [t for t in prompt if t not in skip])
    assert full.startswith(prompt_text)
    assert text == full[len(prompt_text) :]


def test_sentencepiece_word_after_a_prompt_keeps_its_space():
    tokenizer = sentencepiece_tokenizer()
    prompt = tokenizer.encode("And God", add_special_tokens=True)
    word = tokenizer.encode("And God said", add_special_tokens=True)[len(prompt) :]
    assert tokenizer.convert_ids_to_tokens(word[0]).startswith("▁")
    assert decode(tokenizer, word) == "said"  # decoded alone, the space is lost
    text, _ = stream_text(IncrementalDetokenizer(tokenizer, prompt), word)
    assert text == " said"


def test_random_byte_level_tokens_equal_full_decode():
    """Any token sequence, broken UTF-8 included, streams to exactly the full (lossy) decode."""
    tokenizer = byte_level_tokenizer()
    skip = special_ids_to_skip(tokenizer)
    vocab = [i for i in range(len(tokenizer)) if i not in skip]
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 40))]
        text, _ = stream_text(IncrementalDetokenizer(tokenizer), ids)
        assert text == decode(tokenizer, ids)


def test_special_tokens_are_skipped_but_byte_tokens_are_not():
    tokenizer = sentencepiece_tokenizer()
    skip = special_ids_to_skip(tokenizer)
    assert skip == {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    ids = tokenizer.encode("God 😀 said", add_special_tokens=False)
    with_eos = ids[:3] + [tokenizer.eos_token_id] + ids[3:]
    text, _ = stream_text(IncrementalDetokenizer(tokenizer), with_eos)
    assert text == decode(tokenizer, ids)
    assert "😀" in text and "</s>" not in text


def test_a_split_character_is_held_until_complete():
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    byte_ids = [t for t in ids if tokenizer.convert_ids_to_tokens(t).startswith("<0x")]
    assert len(byte_ids) == 4
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert deltas[-4:] == ["", "", "", "😀"]
    assert detok.flush() == ""


@pytest.mark.parametrize("builder", [sentencepiece_tokenizer, byte_level_tokenizer], ids=lambda b: b.__name__)
@pytest.mark.parametrize("missing", [1, 2, 3])
def test_a_budget_ending_inside_a_character_gives_the_text_and_one_replacement_char(builder, missing):
    """Issue 15 kind 12: the finished text plus one U+FFFD. (This test used to expect the full decode, which for
    byte-fallback tokens has one U+FFFD per byte: 'a' + three U+FFFD here.)"""
    tokenizer = builder()
    ids = tokenizer.encode("God said é😀", add_special_tokens=False)
    assert len(ids) - len(tokenizer.encode("God said é", add_special_tokens=False)) == 4  # a token per byte
    text, deltas = stream_text(IncrementalDetokenizer(tokenizer), ids[:-missing])
    assert text == "God said é\ufffd"
    assert deltas[-1] == "\ufffd"  # the flush, once the budget ended


def test_broken_bytes_before_an_unfinished_character_keep_their_own_replacement_char():
    tokenizer = sentencepiece_tokenizer()
    byte = {b: tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x80, 0xF0, 0x9F)}
    ids = tokenizer.encode("a", add_special_tokens=False) + [byte[0x80], byte[0xF0], byte[0x9F]]
    text, _ = stream_text(IncrementalDetokenizer(tokenizer), ids)
    assert text == "a" + b"\x80\xf0\x9f".decode("utf-8", errors="replace") == "a\ufffd\ufffd"


def test_a_shorter_budget_gives_the_start_of_a_longer_ones_text():
    """Bytes that are broken anyway (0x89 starts no character) decode as the tokenizer decodes them, whatever
    token the budget ends on; only an unfinished character at the very end becomes one U+FFFD."""
    tokenizer = sentencepiece_tokenizer()
    byte = {b: tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x89, 0x5D, 0xE2, 0x82)}
    start = tokenizer.encode("a", add_special_tokens=False)
    ids = start + [byte[0x89], byte[0x5D], byte[0xE2], byte[0x82]]
    texts = {n: stream_text(IncrementalDetokenizer(tokenizer), ids[:n])[0] for n in range(len(start), len(ids) + 1)}
    broken = len(start) + 2  # through 0x89 0x5D
    assert texts[broken] == tokenizer.decode(ids[:broken], skip_special_tokens=False)  # as the full decode shows it
    assert texts[broken + 1] == texts[broken + 2] == texts[broken] + "\ufffd"  # one U+FFFD: the unfinished euro sign
    assert all(texts[n + 1].startswith(texts[n].removesuffix("\ufffd")) for n in range(len(start), len(ids)))
