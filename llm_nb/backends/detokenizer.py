"""Token ids to streamed text for Hugging Face tokenizers, a piece per token, never half a character."""

from __future__ import annotations

import threading


class Detokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a character.

    Decoding a window of the last few tokens, and emitting only what the newest
    token added, keeps multi-token characters (UTF-8 split across byte tokens)
    and tokenizers that strip a leading space from a lone piece correct: the
    streamed pieces join to the text the whole id list decodes to.
    """

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer = tokenizer
        self.lock = lock
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
