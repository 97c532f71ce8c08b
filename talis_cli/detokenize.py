"""Incremental detokenization: turn a stream of token ids into text deltas that are always complete.

Decoding tokens one at a time is wrong twice over: SentencePiece drops the leading space (U+2581) of the
first token it decodes, and a character split over byte-fallback tokens (<0xF0><0x9F>...) decodes to U+FFFD
until its last byte arrives. So each step decodes a short window of recent tokens twice, without and with
the new ones, and emits the difference; while the window ends in U+FFFD the text is held back. Works with
any Hugging Face tokenizer; the work per token does not grow with the length of the text.
"""

from __future__ import annotations

import re
from typing import Iterable

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 4  # prompt tokens decoded before the first new one, so its leading space survives
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def special_ids_to_skip(tokenizer) -> frozenset[int]:
    """Special tokens (BOS, EOS, chat markers) that should not appear in the text.

    Byte-fallback tokens (<0xNN>) are kept even when a tokenizer registers them as special: dropping them
    would drop every character they spell.
    """
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return frozenset(i for i in ids if not _BYTE_TOKEN.fullmatch(tokenizer.convert_ids_to_tokens(i) or ""))


def unfinished_char_length(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character whose last bytes are missing (0 if none)."""
    for k in range(1, min(4, len(data)) + 1):
        lead = data[-k]
        if lead & 0xC0 == 0x80:  # a continuation byte: the character starts further back
            continue
        need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        return k if k < need else 0
    return 0


class IncrementalDetokenizer:
    """Feed token ids with push(); each call returns the text that became complete ("" while held back).

    context_ids: tokens that come before the stream (the prompt); only their text's continuation is emitted.
    The concatenation of all push() results and a final flush() equals decoding the whole stream.
    """

    def __init__(self, tokenizer, context_ids: Iterable[int] = (), skip_ids: frozenset[int] | None = None):
        self.tokenizer = tokenizer
        self.skip_ids = special_ids_to_skip(tokenizer) if skip_ids is None else skip_ids
        context = [t for t in context_ids if t not in self.skip_ids]
        self.ids: list[int] = context[-CONTEXT_TOKENS:]
        self.prefix_offset = 0  # window start: tokens before it are settled
        self.read_offset = len(self.ids)  # tokens before it have been emitted as text
        self.prefix_text = self._decode(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text."""
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(self.prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still waits for its last bytes
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is held back: the finished text, and one U+FFFD for a character whose last bytes
        never came (a token budget that ends inside it).

        Byte-level tokenizers already decode an unfinished UTF-8 tail to one U+FFFD; byte-fallback decoders
        (SentencePiece's <0xNN> tokens) give one per byte, so only the unfinished character at the end of a run
        of byte tokens is replaced here, by one U+FFFD; every byte before it decodes as the tokenizer decodes it
        (the text of a shorter budget is then the start of a longer one's).
        """
        if self.read_offset == len(self.ids):
            return ""
        text = self._decode(self.ids[self.prefix_offset :])
        if text.endswith(REPLACEMENT_CHAR):
            cut = unfinished_char_length(bytes(self._byte_tail()))
            if cut:
                text = self._decode(self.ids[self.prefix_offset : len(self.ids) - cut]) + REPLACEMENT_CHAR
        return self._advance(text)

    def _byte_tail(self) -> list[int]:
        """The bytes of the byte-fallback tokens (<0xNN>) that end the held-back tokens."""
        tail = []
        for token_id in reversed(self.ids[self.read_offset :]):
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if not _BYTE_TOKEN.fullmatch(piece):
                break
            tail.append(int(piece[3:5], 16))
        return tail[::-1]

    def _advance(self, text: str) -> str:
        delta = text[len(self.prefix_text) :]
        # The emitted tokens become the next window's prefix; older ones are dropped for good.
        del self.ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.prefix_text = self._decode(self.ids)
        return delta
