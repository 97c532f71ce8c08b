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
        """Return whatever is held back (an unfinished character becomes U+FFFD, as a full decode shows it)."""
        if self.read_offset == len(self.ids):
            return ""
        return self._advance(self._decode(self.ids[self.prefix_offset :]))

    def _advance(self, text: str) -> str:
        delta = text[len(self.prefix_text) :]
        # The emitted tokens become the next window's prefix; older ones are dropped for good.
        del self.ids[: self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.prefix_text = self._decode(self.ids)
        return delta
