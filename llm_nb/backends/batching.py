"""Continuous batching for a Hugging Face causal LM: requests join and leave a running batch.

One engine thread owns the model and a padded KV cache. Each request's
``generate`` call hands the engine a ``Sequence`` and reads its events from a
queue of its own. Every step the engine:

1. drops sequences whose client went away (the worker's ``cancelled`` flag),
2. admits waiting sequences while the batch has room: each prompt is prefilled
   alone (no padding, so a prompt's cache is the same whether it runs alone or
   beside others), its first token is sampled, and its cache is merged into the
   batch cache, left-padded to a common length,
3. decodes one token for every sequence in one forward pass, with an attention
   mask that hides each row's padding and position ids that count only its
   real tokens (so RoPE and learned positions see what they would alone),
4. samples per sequence (its own temperature, top-k/p, min-p, penalties, seed),
   streams text through its own stop buffer, and removes finished rows, trimming
   cache columns that have become padding for every row left.

Padding keys and values are zeros and always masked, so a row's attention
sums the same real terms alone or in a batch: greedy outputs match.
"""

from __future__ import annotations

import collections
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .base import Finished, GenerationEvent, GenerationRequest, StopBuffer, TextDelta
from .constraints import LogprobQueue, logprob_entry
from .detokenizer import Detokenizer
from .prompt_cache import MIN_PREFIX_TOKENS, PromptCache, as_ids
from .sampling import pick, plain_greedy

log = logging.getLogger("llm_nb.backends.batching")


@dataclass
class Sequence:
    """One request inside the engine, and the queue its ``generate`` call reads."""

    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int
    stops: list[str]
    cancelled: threading.Event
    detokenizer: Detokenizer
    events: queue.Queue = field(default_factory=queue.Queue)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    abandoned: bool = False  # the generate() call ended (its consumer closed it)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: Any = None
    constraint: Any = None  # a backends.constraints.Constraint when the reply must match a grammar
    logprobs: LogprobQueue = field(default_factory=LogprobQueue)
    last_entry: dict | None = None  # the sampled token's logprob entry, until the token is accepted
    token_bytes: Any = None  # token id -> its exact bytes, for logprob entries (else the tokenizer's decode)

    def __post_init__(self) -> None:
        self.stopper = StopBuffer(self.stops)

    @property
    def gone(self) -> bool:
        return self.abandoned or self.cancelled.is_set()

    @property
    def guided(self) -> bool:
        """This row needs its own logits looked at: a grammar, or logprobs to report."""
        return self.constraint is not None or self.request.logprobs is not None

    def taken_logprobs(self, text: str, final: bool = False) -> list[dict] | None:
        return self.logprobs.take(text, final) if self.request.logprobs is not None else None

    def emit(self, event: GenerationEvent | BaseException) -> None:
        self.events.put(event)

    def finish(self, reason: str) -> None:
        if self.done:
            return
        tail = self.stopper.push(self.detokenizer.flush()) + self.stopper.flush()
        rest = self.taken_logprobs(tail, final=not self.stopper.stopped)
        if tail or rest:  # rest: tokens that decoded to no text of their own
            self.emit(TextDelta(tail, rest))
        self.emit(Finished(reason, len(self.prompt_ids), len(self.generated)))
        self.done = True

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.emit(exc)


class BatchEngine:
    """Runs up to ``max_batch`` sequences of one causal LM together, in a thread of its own."""

    def __init__(
        self,
        model,
        tokenizer,
        tokenizer_lock: threading.Lock,
        *,
        device,
        eos_ids: set[int],
        max_batch: int,
        cache_bytes: int = 0,
    ):
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.device = device
        self.eos_ids = set(eos_ids)
        self.max_batch = max(1, int(max_batch))
        self.inbox: queue.Queue[Sequence | None] = queue.Queue()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.rows: list[Sequence] = []
        self.cache = None  # DynamicCache over self.rows, left-padded
        self.mask = None  # [rows, cache length]: 1 where a row has a real token
        self.next_tokens: list[int] = []  # each row's newest token, not yet in the cache
        self.steps = 0
        self.tokens_out = 0
        self.largest_batch = 0
        self._stopping = False
        #: Prompts' KV by their tokens: a prompt that extends a cached one (the next turn of a
        #: conversation, any notebook's) prefills only what is new.
        self.prompt_cache = PromptCache(cache_bytes)
        forward = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward
        # transformers renamed forward's ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._thread.start()

    # --- the public side: called from generate() threads ------------------------
    def submit(self, seq: Sequence) -> None:
        if self._stopping:
            raise RuntimeError("the batching engine has stopped")
        self.inbox.put(seq)

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.rows),
            "waiting": len(self.waiting) + self.inbox.qsize(),
            "steps": self.steps,
            "tokens_generated": self.tokens_out,
            "largest_batch": self.largest_batch,
        }

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.inbox.put(None)
        self._thread.join(timeout)

    # --- the engine thread --------------------------------------------------------
    def _run(self) -> None:
        with self.torch.inference_mode():
            while not self._stopping:
                try:
                    self._take_new(block=not self.rows and not self.waiting)
                    if self._stopping:
                        break
                    self._drop_gone()
                    self._admit()
                    if self.rows:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its sequences; the engine goes on
                    log.exception("batch step failed")
                    for seq in self.rows:
                        seq.fail(exc)
                    self._reset()
        for seq in [*self.rows, *self.waiting]:
            seq.fail(RuntimeError("the model is shutting down"))

    def _take_new(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self._stopping = True
                return
            self.waiting.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_gone(self) -> None:
        for seq in [s for s in self.waiting if s.gone]:
            self.waiting.remove(seq)
            seq.finish("cancelled")
        gone = [i for i, s in enumerate(self.rows) if s.gone]
        if gone:
            for i in gone:
                self.rows[i].finish("cancelled")
            self._keep_rows([i for i in range(len(self.rows)) if i not in gone])

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.next_tokens = [], None, None, []

    # --- admission: prefill alone, merge into the batch ---------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.rows) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.gone:
                seq.finish("cancelled")
                continue
            try:
                cache, token = self._prefill(seq)
            except Exception as exc:  # this prompt failed (e.g. out of memory): the batch goes on
                log.exception("prefill failed")
                seq.fail(exc)
                continue
            self._accept(seq, token)
            if not seq.done:
                self._merge(seq, cache, token)

    def _prefill(self, seq: Sequence):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache()
        start = self._cached_prefix(seq, cache) if self.prompt_cache.enabled else 0
        ids = torch.tensor([seq.prompt_ids[start:]], dtype=torch.long, device=self.device)
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        kwargs[self._cache_arg] = cache
        out = self.model(input_ids=ids, use_cache=True, **kwargs)
        self.steps += 1
        cache = _returned_cache(out)
        if self.prompt_cache.enabled:
            self._keep_prompt(seq, cache)
        return cache, self._sample(seq, out.logits[0, -1].float())

    def _cached_prefix(self, seq: Sequence, cache) -> int:
        """Fill ``cache`` with the longest cached prefix of the prompt; how many tokens it holds.
        At least the prompt's last token is left to read: its logits give the first new token."""
        entry, shared = self.prompt_cache.longest(as_ids(seq.prompt_ids))
        shared = min(shared, len(seq.prompt_ids) - 1)
        if entry is None or shared < MIN_PREFIX_TOKENS:
            self.prompt_cache.record(0)
            return 0
        for index, (keys, values) in enumerate(entry.state):
            cache.update(keys[:, :, :shared, :], values[:, :, :shared, :], index)  # copies: the entry stays whole
        self.prompt_cache.touch(entry)
        self.prompt_cache.record(shared)
        return shared

    def _keep_prompt(self, seq: Sequence, cache) -> None:
        """Keep the prompt's KV. Nothing writes into these tensors later (the batch's cache grows by
        concatenation into new ones), so the entry holds them as they are, without a copy."""
        layers = getattr(cache, "layers", None)
        # Layers that crop (sliding windows) or quantise do not hold the whole prefix: not cached.
        if not layers or any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in layers):
            return
        state = [(layer.keys, layer.values) for layer in layers]
        nbytes = sum(t.numel() * t.element_size() for pair in state for t in pair)
        self.prompt_cache.put(as_ids(seq.prompt_ids), state, nbytes)

    def _merge(self, seq: Sequence, cache, token: int) -> None:
        torch = self.torch
        length = len(seq.prompt_ids)
        row_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, row_mask
        else:
            current = self.mask.shape[1]
            width = max(current, length)
            for batch_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
                if batch_layer.keys is None or new_layer.keys is None:
                    continue
                batch_layer.keys = torch.cat(
                    [_pad_left(batch_layer.keys, width - current), _pad_left(new_layer.keys, width - length)]
                )
                batch_layer.values = torch.cat(
                    [_pad_left(batch_layer.values, width - current), _pad_left(new_layer.values, width - length)]
                )
            self.mask = torch.cat(
                [
                    torch.nn.functional.pad(self.mask, (width - current, 0)),
                    torch.nn.functional.pad(row_mask, (width - length, 0)),
                ]
            )
        self.rows.append(seq)
        self.next_tokens.append(token)
        if len(self.rows) > self.largest_batch:
            self.largest_batch = len(self.rows)
            log.info("batch grew to %d rows (most so far)", self.largest_batch)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only these rows; trim cache columns that are padding for every row left."""
        if not keep:
            self._reset()
            return
        torch = self.torch
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                if layer.keys is not None:
                    layer.keys = layer.keys.index_select(0, index)
                    layer.values = layer.values.index_select(0, index)
            self.mask = self.mask.index_select(0, index)
            self.rows = [self.rows[i] for i in keep]
            self.next_tokens = [self.next_tokens[i] for i in keep]
        first = int(self.mask.any(dim=0).long().argmax())
        if first > 0:
            for layer in self.cache.layers:
                if layer.keys is not None:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]
            self.mask = self.mask[:, first:]

    # --- one decoding step for the whole batch -------------------------------------------
    def _decode_step(self) -> None:
        torch = self.torch
        rows = len(self.rows)
        input_ids = torch.tensor(self.next_tokens, dtype=torch.long, device=self.device).view(rows, 1)
        positions = self.mask.sum(dim=1, keepdim=True)  # real tokens so far = the new token's position
        mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long, device=self.device)], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.cache},
        )
        self.cache, self.mask = _returned_cache(out), mask
        self.steps += 1
        logits = out.logits[:, -1, :].float()
        greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for i, seq in enumerate(self.rows):
            token = greedy[i] if plain_greedy(seq.request) and not seq.guided else self._sample(seq, logits[i])
            self._accept(seq, token)
            if not seq.done:
                self.next_tokens[i] = token
                keep.append(i)
        if len(keep) < rows:
            self._keep_rows(keep)

    # --- tokens in, text out --------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if token in self.eos_ids:
            seq.finish("stop")
            return
        seq.generated.append(token)
        self.tokens_out += 1
        if seq.constraint is not None:
            try:
                seq.constraint.consume(token)
            except Exception as exc:  # this row's grammar broke: end it alone, the batch goes on
                seq.fail(exc)
                return
        piece = seq.detokenizer.push(token)
        if seq.last_entry is not None:
            seq.logprobs.add(seq.last_entry, piece)
            seq.last_entry = None
        text = seq.stopper.push(piece)
        if text:
            seq.emit(TextDelta(text, seq.taken_logprobs(text)))
        if seq.stopper.stopped or (seq.constraint is not None and seq.constraint.done):
            seq.finish("stop")
        elif len(seq.generated) >= seq.max_new_tokens:
            seq.finish("length")

    def _sample(self, seq: Sequence, logits) -> int:
        """One token for one sequence from its last logits (float32, [vocab])."""
        torch = self.torch
        request = seq.request
        raw = None
        if request.logprobs is not None:  # of the raw distribution, before penalties and the grammar
            raw = torch.log_softmax(logits, dim=-1).cpu().numpy()
        if seq.constraint is not None:
            allowed = torch.from_numpy(seq.constraint.allowed(logits.shape[-1])).to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        token = pick(self.torch, seq, logits, self.device)
        if raw is not None:
            seq.last_entry = logprob_entry(raw, token, request.logprobs, seq.token_bytes or self._piece)
        return token

    def _piece(self, token: int) -> bytes:
        with self.tokenizer_lock:
            return self.tokenizer.decode([token]).encode("utf-8")


def _returned_cache(out: Any) -> Any:
    """The KV cache a forward returned: ``cache`` in newer transformers, ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_left(tensor, amount: int):
    """Zero keys/values in front of a [batch, heads, length, dim] cache tensor."""
    if amount <= 0:
        return tensor
    import torch

    return torch.nn.functional.pad(tensor, (0, 0, amount, 0))
