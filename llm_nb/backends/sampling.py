"""Choosing a sequence's next token from its logits: penalties, then greedy or sampling.

Per sequence of a batch (``batching.Sequence``): its own temperature, top-k, min-p,
top-p, penalties and seeded generator, so a row samples what it would alone.
"""

from __future__ import annotations

import collections
import random

from .base import GenerationRequest

#: How many recent tokens ``repeat_penalty`` looks at, as llama.cpp does (``repeat_last_n``).
REPEAT_LAST_N = 64


def pick(torch, seq, logits, device) -> int:
    """Penalties, then greedy or sampling (temperature, top-k, min-p, top-p, the row's seed)."""
    request = seq.request
    logits = apply_penalties(torch, logits, seq)
    if request.temperature <= 0:
        return int(logits.argmax())
    logits = logits / request.temperature
    vocab = logits.shape[-1]
    if request.top_k and 0 < request.top_k < vocab:
        kth = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if request.min_p and request.min_p > 0:
        probs = probs.masked_fill(probs < request.min_p * probs.max(), 0.0)
    if request.top_p is not None and request.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(ordered, dim=-1)
        cut = cumulative - ordered > request.top_p  # keep the smallest set reaching top_p
        ordered = ordered.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    if seq.generator is None:
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        seq.generator = torch.Generator(device=device).manual_seed(int(seed))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=seq.generator))


def plain_greedy(request: GenerationRequest) -> bool:
    """Greedy with no penalties: the batch-wide argmax is this row's token."""
    no_penalty = (
        request.repeat_penalty in (None, 1.0) and not request.presence_penalty and not request.frequency_penalty
    )
    return request.temperature <= 0 and no_penalty


def apply_penalties(torch, logits, seq):
    """Repeat (over the last REPEAT_LAST_N tokens), presence and frequency penalties, as llama.cpp applies them."""
    request = seq.request
    if request.repeat_penalty and request.repeat_penalty != 1.0:
        recent = (seq.prompt_ids + seq.generated)[-REPEAT_LAST_N:]
        if recent:
            index = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
            picked = logits.index_select(0, index)
            picked = torch.where(picked > 0, picked / request.repeat_penalty, picked * request.repeat_penalty)
            logits = logits.index_copy(0, index, picked)
    if (request.presence_penalty or request.frequency_penalty) and seq.generated:
        counts = collections.Counter(seq.generated)
        index = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(
            0, index, -(times * (request.frequency_penalty or 0.0) + (request.presence_penalty or 0.0))
        )
    return logits
