"""The conversations of a llama.cpp context: the one it holds, and saved ones to swap in.

A context holds one sequence. When notebooks take turns on a model, each turn would
find another notebook's conversation there; this keeps the conversations the context
gives up (their sequence state, ``llama_state_seq_get_data``) in a ``PromptCache`` and
puts back the one a prompt shares the longest prefix with, so ``Llama.generate`` reads
only the rest of the prompt.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

from .prompt_cache import DEFAULT_CONTEXTS, MIN_PREFIX_TOKENS, PromptCache, as_ids, common_prefix

#: A saved conversation's buffer has room for this many more tokens, so its next turns fit in it.
CACHE_ROOM_TOKENS = 256


def kv_bytes_per_token(llm) -> int:
    """One token's keys and values over all layers (16-bit, llama.cpp's default KV type)."""
    import llama_cpp

    model = llm._model.model
    heads = max(1, llama_cpp.llama_model_n_head(model))
    head_dim = llama_cpp.llama_model_n_embd(model) // heads
    return 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2


class ContextConversations:
    """The context of one ``Llama`` and its saved conversations, capped at ``cap_bytes`` (None: the
    default, four full contexts' KV). Callers hold the backend's lock."""

    def __init__(self, llm, cap_bytes: int | None):
        self.llm = llm
        self.kv_bytes_per_token = kv_bytes_per_token(llm)
        default = DEFAULT_CONTEXTS * llm.n_ctx() * self.kv_bytes_per_token
        self.cache = PromptCache(default if cap_bytes is None else cap_bytes)
        #: (when the context's conversation was used before its current turn, when that turn began)
        self._live_used: tuple[float | None, float] = (None, time.monotonic())
        self._live_buffer: np.ndarray | None = None  # the buffer the context's conversation came from

    def stats(self) -> dict[str, Any]:
        return {**self.cache.stats(), "device": "cpu"}  # saved states are copied to RAM, whatever runs the model

    def prepare(self, tokens: list[int]) -> None:
        """Make the context hold the longest prefix of ``tokens`` that is to be had: what it holds
        already, or a cached state that shares more. A conversation the context would lose is saved
        first; a state restored into the context leaves the cache (the context holds it now, and saves
        it again when it moves on). ``Llama.generate`` then reads only the rest of the prompt."""
        prompt = as_ids(tokens)
        live = self.llm.input_ids[: self.llm.n_tokens]
        in_context = common_prefix(live, prompt)
        entry, cached = self.cache.longest(prompt)
        restore = entry is not None and cached >= in_context + MIN_PREFIX_TOKENS
        kept = cached if restore else in_context
        now = time.monotonic()
        if restore:
            self.cache.remove(entry)  # before saving the context: making room must not evict it
        # What the context holds past the prompt's shared prefix is lost to this request: keep it.
        if len(live) - in_context >= MIN_PREFIX_TOKENS and not self.cache.holds(live):
            self._save(live.copy())
        if restore and not self._restore(entry):
            kept = restore = 0
        self.cache.record(kept)
        # When the conversation now in the context was used before this turn (None: never).
        if restore:
            self._live_used, self._live_buffer = (entry.last_used, now), entry.state
        elif kept >= MIN_PREFIX_TOKENS:
            self._live_used = (self._live_used[1], now)
        else:  # new here, or back after its eviction
            self._live_used, self._live_buffer = (self.cache.last_seen(prompt), now), None

    def _save(self, tokens) -> None:
        """Save the context's sequence into the cache: into the buffer it was restored from where that
        has room, else into a new one with room for a few more turns. (A fresh buffer costs more to
        fault in than the copy itself: 20 ms against 4 for 30 MiB, measured here.)"""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if not size or size > self.cache.cap_bytes:
            return
        buffer, self._live_buffer = self._live_buffer, None
        if buffer is None or buffer.nbytes < size:
            step = CACHE_ROOM_TOKENS * self.kv_bytes_per_token
            buffer = np.empty(min(-(-size // step) * step, self.cache.cap_bytes), dtype=np.uint8)
        written = llama_cpp.llama_state_seq_get_data(
            ctx, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0
        )
        if written:
            self.cache.put(tokens, buffer, buffer.nbytes, used=written, keep_newer_than=self._live_used[0])

    def _restore(self, entry) -> bool:
        import llama_cpp

        self.llm._ctx.kv_cache_clear()
        source = entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if not llama_cpp.llama_state_seq_set_data(self.llm._ctx.ctx, source, entry.used, 0):
            self.llm.reset()  # nothing usable in the context now: the prompt is read from the start
            return False
        n = len(entry.tokens)
        self.llm.input_ids[:n] = entry.tokens
        self.llm.n_tokens = n
        self.llm._requires_eval = True  # the logits are not the restored state's: decode the last token again
        return True
