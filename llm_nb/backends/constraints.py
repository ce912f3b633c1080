"""Constrained decoding and logprobs, shared by the llama.cpp and transformers backends.

The host builds and validates an llguidance grammar (``llm_nb.host.structured``);
here a ``Constraint`` compiles it against the model's vocabulary and, at every
token, says which tokens may come next. llguidance was chosen over llama.cpp's
own GBNF grammars (about 60 % of unconstrained speed on SmolLM2, measured) and
xgrammar (it needs torch and triton, which the llama.cpp install does not have):
its masks cost little enough that a schema keeps the unconstrained speed.
A request without a grammar never reaches this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InvalidRequest, StructuredOutputError

#: Tokens one top_logprobs list may hold (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


class Constraint:
    """One request's grammar, matched token by token."""

    def __init__(self, tokenizer: Any, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(
                f"the grammar does not compile for this model: {self.matcher.get_error()}", code="invalid_schema"
            )

    def allowed(self, size: int) -> np.ndarray:
        """A boolean mask over ``size`` logits: True where the grammar lets the token come next.

        Logits past the tokenizer's vocabulary (padding some models add) are never allowed.
        """
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = np.zeros(size, dtype=bool)
        n = min(size, bits.size)
        mask[:n] = bits[:n].astype(bool)
        return mask

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            # Cannot happen while every token is masked; if it does, end the reply rather than go on unconstrained.
            reason = (self.matcher.get_error() or "token refused").strip().splitlines()[0]
            raise StructuredOutputError(f"constrained decoding failed at token {int(token)}: {reason}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only the end of the text may follow."""
        return self.matcher.is_stopped()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    row = logits.astype(np.float64, copy=False)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


#: The logprob of a token that cannot come (masked, or -inf), as OpenAI reports it.
FLOOR_LOGPROB = -9999.0


def logprob_entry(logprobs: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> dict:
    """One generated token's entry, OpenAI's shape: its logprob and the ``top`` most likely alternatives."""

    def item(token_id: int) -> dict:
        raw = piece(int(token_id))
        return {
            "token": raw.decode("utf-8", errors="replace"),
            # A token the grammar forbids has -inf, which is not JSON: OpenAI writes -9999.0.
            "logprob": max(float(logprobs[token_id]), FLOOR_LOGPROB),
            "bytes": list(raw),
        }

    entry = item(token)
    top = max(0, min(int(top), MAX_TOP_LOGPROBS, len(logprobs)))
    if top:
        best = np.argpartition(-logprobs, top - 1)[:top]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        entry["top_logprobs"] = [item(int(t)) for t in best]
    else:
        entry["top_logprobs"] = []
    return entry


class LogprobQueue:
    """Entries of generated tokens, handed out with the text delta that shows their text.

    Positions count characters of the decoded text the stop buffer is fed. A token whose
    text the stop buffer holds back waits here until that text is shown; tokens a stop
    sequence swallows whole are never handed out.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[int, dict]] = []  # (where the token's text starts, its entry)
        self.decoded = 0
        self.shown = 0

    def add(self, entry: dict, text: str) -> None:
        """A token's entry and the text it decoded to ("" while the decoder waits for more bytes)."""
        self.pending.append((self.decoded, entry))
        self.decoded += len(text)

    def take(self, shown: str, final: bool = False) -> list[dict]:
        """The entries that go with the delta ``shown``; ``final``: the reply ended without a stop sequence."""
        self.shown += len(shown)
        cut = len(self.pending)
        if not final:
            cut = next((i for i, (start, _) in enumerate(self.pending) if start >= self.shown), cut)
        out = [entry for _, entry in self.pending[:cut]]
        del self.pending[:cut]
        return out
