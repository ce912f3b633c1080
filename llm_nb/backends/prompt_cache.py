"""Saved model states keyed by the tokens they hold: a prompt reuses the longest cached prefix.

Notebooks that share one model take turns on it. Without a cache each turn finds
another notebook's conversation in the model's context and reads its own whole
history again; with one, the state of each recent conversation is kept, and a
request picks up from the one whose tokens share the longest prefix with its
prompt, whichever notebook it came from (as llama.cpp's server picks the slot
whose cached prompt is most similar). What a state is belongs to the backend
(llama.cpp's sequence state, a transformers KV cache); this module keeps them
under a byte cap, least recently used out first, and counts hits.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A cached prefix shorter than this is not worth a restore (a chat template's opening is about this long).
MIN_PREFIX_TOKENS = 32
#: The default cap, in full contexts' worth of KV: room for this many notebooks' conversations at
#: full length beside the one in the model's context.
DEFAULT_CONTEXTS = 4


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two id arrays share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def as_ids(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def _extends(tokens: np.ndarray, prefix: np.ndarray) -> bool:
    """Whether ``tokens`` begins with all of ``prefix``."""
    return len(prefix) <= len(tokens) and common_prefix(prefix, tokens) == len(prefix)


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # the tokens whose state is held, in order
    state: Any  # the backend's saved state (for llama.cpp: a byte buffer, maybe larger than the state)
    nbytes: int  # what it holds in memory: what counts against the cap
    used: int = 0  # bytes of ``state`` that are the state (a buffer has room to grow)
    last_used: float = field(default_factory=time.monotonic)


class PromptCache:
    """States of recent prompts, at most ``cap_bytes`` of them; thread-safe."""

    def __init__(self, cap_bytes: int):
        self.cap_bytes = max(0, int(cap_bytes))
        self.entries: list[Entry] = []
        self.hits = 0  # requests that reused a cached prefix (restored, or still in the context)
        self.misses = 0  # requests that read their prompt from the start
        self.reused_tokens = 0
        self.evictions = 0
        #: The tokens of recently evicted entries and when they were last used: a conversation that
        #: comes back after its eviction still has a past (``last_seen``).
        self._evicted: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=64)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.cap_bytes > 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def longest(self, tokens: np.ndarray) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``tokens``, and that prefix's length."""
        with self._lock:
            best, length = None, 0
            for entry in self.entries:
                shared = common_prefix(entry.tokens, tokens)
                if shared > length:
                    best, length = entry, shared
            return best, length

    def holds(self, tokens: np.ndarray) -> bool:
        """Whether an entry already holds ``tokens`` (or more after them): saving them again gains nothing."""
        with self._lock:
            return any(_extends(e.tokens, tokens) for e in self.entries)

    def last_seen(self, tokens: np.ndarray) -> float | None:
        """When the evicted entry that shares the longest prefix with ``tokens`` was last used, if any does."""
        with self._lock:
            best, length = None, MIN_PREFIX_TOKENS - 1
            for evicted, last_used in self._evicted:
                shared = common_prefix(evicted, tokens)
                if shared > length:
                    best, length = last_used, shared
            return best

    def touch(self, entry: Entry) -> None:
        entry.last_used = time.monotonic()

    def remove(self, entry: Entry) -> None:
        """Take ``entry`` out: its state is going back into the model's context, which then holds it."""
        with self._lock:
            if entry in self.entries:
                self.entries.remove(entry)

    def put(
        self,
        tokens: np.ndarray,
        state: Any,
        nbytes: int,
        used: int | None = None,
        keep_newer_than: float | None = None,
    ) -> bool:
        """Keep ``state`` for ``tokens``; entries it extends go, then the least recently used until it fits.

        ``keep_newer_than``: when the conversation being saved was last used before this turn (None: it
        is new). Entries used since then are not evicted for it; if it only fits by evicting them, it is
        not kept. Notebooks that take turns over more conversations than the cap holds then keep most of
        them warm, where plain LRU would evict each one just before its turn comes round again.
        """
        if nbytes > self.cap_bytes:
            return False
        with self._lock:
            # An entry whose tokens are a prefix of these is superseded: this state answers all it would.
            kept = [e for e in self.entries if not _extends(tokens, e.tokens)]
            kept.sort(key=lambda e: e.last_used)
            evictable = [e for e in kept if keep_newer_than is None or e.last_used < keep_newer_than]
            over = sum(e.nbytes for e in kept) + nbytes - self.cap_bytes
            if over > sum(e.nbytes for e in evictable):
                return False  # room only at the cost of conversations in use more often than this one
            while over > 0:
                victim = evictable.pop(0)
                kept.remove(victim)
                over -= victim.nbytes
                self.evictions += 1
                self._evicted.append((victim.tokens, victim.last_used))
            self.entries = [*kept, Entry(tokens, state, nbytes, nbytes if used is None else used)]
            return True

    def record(self, reused: int) -> None:
        """One request's outcome: ``reused`` prompt tokens it did not have to read."""
        with self._lock:
            if reused >= MIN_PREFIX_TOKENS:
                self.hits += 1
                self.reused_tokens += reused
            else:
                self.misses += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            asked = self.hits + self.misses
            return {
                "entries": len(self.entries),
                "bytes": sum(e.nbytes for e in self.entries),
                "cap_bytes": self.cap_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / asked, 3) if asked else None,
                "reused_tokens": self.reused_tokens,
                "evictions": self.evictions,
            }
