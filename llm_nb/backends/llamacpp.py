"""llama.cpp backend (llama-cpp-python): GGUF files, CPU or CUDA.

The generation loop is ours rather than ``create_chat_completion``'s, so that
the worker sees every token: cancellation is checked per token, usage is
counted exactly in streaming too, and a prompt longer than the context is an
error rather than a silent truncation.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..cpu import has_amx
from ..errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest, ModelFailed
from .base import (
    Backend,
    Finished,
    GenerationEvent,
    GenerationRequest,
    Progress,
    StopBuffer,
    TextDelta,
    check_token_ids,
    coerce_option,
    tokenize_chat_prompt,
)
from .constraints import Constraint, LogprobQueue, log_softmax, logprob_entry
from .prompt_cache import DEFAULT_CONTEXTS, MIN_PREFIX_TOKENS, PromptCache, as_ids, common_prefix

#: Options a load may set, with their types; anything else is refused by name.
LOAD_OPTIONS: dict[str, type] = {
    "n_ctx": int,
    "n_threads": int,
    "n_threads_batch": int,
    "n_batch": int,
    "n_gpu_layers": int,
    "main_gpu": int,
    "seed": int,
    "embedding": bool,
    "use_mmap": bool,
    "use_mlock": bool,
    "flash_attn": bool,
    # llama.cpp's extra buffer types (CPU repacking, AMX): true, false or auto (off on AMX CPUs only)
    "extra_buffers": bool,
    # the conversation cache's cap (bytes of saved KV state); 0 turns it off
    "cache_bytes": int,
}
#: Options of ours, not Llama()'s keyword arguments.
OWN_OPTIONS = ("extra_buffers", "cache_bytes")
#: A saved conversation's buffer has room for this many more tokens, so its next turns fit in it.
CACHE_ROOM_TOKENS = 256
DEFAULT_N_CTX = 4096


def cuda_available() -> bool:
    import llama_cpp

    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except AttributeError:
        return False


def coerce_options(options: dict[str, Any]) -> dict[str, Any]:
    return {key: coerce_option("llama.cpp", key, value, LOAD_OPTIONS) for key, value in options.items()}


def system_info() -> str:
    """llama.cpp's own line on what it was built with and uses here (``AVX2 = 1 | ... | REPACK = 1``)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def extra_buffers_default() -> bool:
    """Extra buffer types are a speed-up (weights repacked for the CPU's widest kernels), except
    on AMX CPUs, where llama.cpp's AMX buffer crashes the first decode (llama.cpp issue 20824).
    AMX is taken from the CPU's flags, or from llama.cpp's word that it uses AMX here."""
    return not (has_amx() or "AMX_INT8 = 1" in system_info())


def extra_buffers_option(value: Any) -> bool:
    """The ``extra_buffers`` load option: true, false, or auto (None)."""
    word = "auto" if value is None else str(value).strip().lower()
    if word == "auto":
        return extra_buffers_default()
    if word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return word in ("1", "true", "yes", "on")
    raise InvalidRequest(f"option extra_buffers={value!r} must be true, false or auto")


@contextlib.contextmanager
def model_params_with(**fields: Any) -> Iterator[None]:
    """Llama() builds its llama_model_params inside __init__ from llama_model_default_params() and
    takes no argument for some of their fields (use_extra_bufts among them): for the length of one
    construction, the defaults it starts from carry ``fields``. Llama keeps the params it used as
    ``model_params``, so what was set can be read back."""
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params

    def defaults():
        params = original()
        for name, value in fields.items():
            if hasattr(params, name):  # an older llama-cpp-python lacks it, and the llama.cpp it binds, too
                setattr(params, name, value)
        return params

    native.llama_model_default_params = defaults
    try:
        yield
    finally:
        native.llama_model_default_params = original


class LlamaCppBackend(Backend):
    name = "llamacpp"
    parallel = 1  # one llama context: requests run in turn

    def load(self, progress: Progress) -> None:
        import llama_cpp
        from llama_cpp import Llama

        if not self.spec.path or not os.path.isfile(self.spec.path):
            raise ModelFailed(f"GGUF file {self.spec.path!r} does not exist")
        raw = dict(self.spec.options)
        device = str(raw.pop("device", "auto") or "auto").lower()
        extra = raw.pop("extra_buffers", None)
        options = coerce_options(raw)
        self.gpu = cuda_available()
        if device.startswith("cuda"):
            if not self.gpu:
                raise BackendUnavailable(
                    f"device {device!r} was asked for, but this llama-cpp-python has no GPU support or sees no GPU; "
                    "use device=cpu, or install a CUDA build of llama-cpp-python"
                )
            if ":" in device:
                options["main_gpu"] = int(device.split(":", 1)[1])
        elif device == "cpu":
            options["n_gpu_layers"] = 0
        elif device != "auto":
            raise InvalidRequest(f"device must be auto, cpu or cuda[:N], not {device!r}")
        options.setdefault("n_ctx", DEFAULT_N_CTX)
        options.setdefault("n_gpu_layers", -1 if self.gpu else 0)
        if options.get("n_threads") is None:
            # Half the cores, as llama.cpp's own server does: on a box shared by notebooks,
            # a thread per core makes every decode wait on whichever thread was preempted.
            options["n_threads"] = max(1, min((os.cpu_count() or 2) // 2, 8))
        options["extra_buffers"] = extra_buffers_option(extra)
        self.options = options
        progress(f"reading {os.path.basename(self.spec.path)}", 0.1)
        llama_kwargs = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
        try:
            with model_params_with(use_extra_bufts=options["extra_buffers"]):
                self.llm = Llama(model_path=self.spec.path, verbose=False, **llama_kwargs)
        except ValueError as exc:  # llama-cpp-python's way of saying "could not load"
            raise ModelFailed(f"llama.cpp could not load {self.spec.path}: {exc}") from exc
        self.vocab = self.llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.formatter = self._chat_formatter()
        self.lock = threading.Lock()
        self._lltokenizer = None
        cap = options.get("cache_bytes")
        self.cache = PromptCache(
            DEFAULT_CONTEXTS * self.llm.n_ctx() * self.kv_bytes_per_token() if cap is None else cap
        )
        #: (when the context's conversation was used before its current turn, when that turn began)
        self._live_used: tuple[float | None, float] = (None, time.monotonic())
        self._live_buffer: np.ndarray | None = None  # the buffer the context's conversation came from
        progress("ready", 1.0)

    def cache_stats(self) -> dict[str, Any]:
        return {**self.cache.stats(), "device": "cpu"}  # saved states are copied to RAM, whatever runs the model

    def kv_bytes_per_token(self) -> int:
        """One token's keys and values over all layers (16-bit, llama.cpp's default KV type)."""
        import llama_cpp

        model = self.llm._model.model
        heads = max(1, llama_cpp.llama_model_n_head(model))
        head_dim = llama_cpp.llama_model_n_embd(model) // heads
        return 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim * 2

    # --- the conversation cache ------------------------------------------------
    def _prepare_context(self, tokens: list[int]) -> None:
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
            self._save_context(live.copy())
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

    def _save_context(self, tokens) -> None:
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
            step = CACHE_ROOM_TOKENS * self.kv_bytes_per_token()
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

    def _chat_formatter(self):
        from llama_cpp import llama_chat_format

        name = self.spec.chat_format
        if name:
            formatter = getattr(llama_chat_format, "format_" + name.replace("-", "_").replace(".", "_"), None)
            if formatter is None:
                raise InvalidRequest(
                    f"unknown chat format {name!r} for llama.cpp (e.g. chatml, llama-2, mistral-instruct)"
                )
            return formatter
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return llama_chat_format.format_chatml  # the common default for instruct GGUFs lacking one
        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    # --- prompts -------------------------------------------------------------
    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """Token ids of the prompt, and stop strings the chat format adds."""
        if request.kind == "chat":

            def render(messages: list[dict], tools: list | None) -> str:
                return self.formatter(messages=messages, **({"tools": tools} if tools else {})).prompt

            try:
                messages, tools = self.chat_messages(request, render)
                result = self.formatter(messages=messages, **({"tools": tools} if tools else {}))
            except Exception as exc:  # a template that refuses the messages (e.g. roles out of order)
                raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc
            stops = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])

            def encode(text: str, special: bool, first: bool) -> list[int]:
                add_bos = first and not result.added_special
                return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

            tokens = tokenize_chat_prompt(result.prompt, [messages, tools], self._spells_control, encode)
            return tokens, [s for s in stops if s]
        return self.llm.tokenize((request.prompt or "").encode("utf-8"), add_bos=True, special=True), []

    def generate(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[GenerationEvent]:
        tokens, format_stops = self._prompt_tokens(request)
        n_ctx = self.llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(tokens)} tokens but {self.spec.name!r} was loaded with a context of {n_ctx}; "
                "shorten it, start a new conversation, or load the model with a larger n_ctx",
                prompt_tokens=len(tokens),
                context_length=n_ctx,
            )
        room = n_ctx - len(tokens)
        max_tokens = room if not request.max_tokens or request.max_tokens <= 0 else min(request.max_tokens, room)
        stopper = StopBuffer(list(request.stop) + format_stops)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        finish = "length"
        with self.lock:  # also keeps concurrent first requests from building the llguidance tokenizer twice
            if self.cache.enabled:
                self._prepare_context(tokens)
            guide = _Guide(self, request) if request.grammar or request.logprobs is not None else None
            if request.seed is not None:
                self.llm.set_seed(int(request.seed))
            greedy = request.temperature <= 0
            for token in self.llm.generate(
                tokens,
                temp=request.temperature,
                top_p=1.0 if greedy else request.top_p,
                top_k=1 if greedy else request.top_k,
                min_p=0.0 if greedy else request.min_p,
                repeat_penalty=request.repeat_penalty,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                logits_processor=[guide.process] if guide else None,
            ):
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                if self._is_eog(self.vocab, token):
                    finish = "stop"
                    break
                produced += 1
                piece = decoder.decode(self.llm.detokenize([token]))
                if guide:
                    guide.accept(token, piece)
                text = stopper.push(piece)
                if text:
                    yield TextDelta(text, guide.taken(text) if guide else None)
                if stopper.stopped or (guide and guide.complete):
                    finish = "stop"
                    break
                if produced >= max_tokens:
                    break
        tail = stopper.push(decoder.decode(b"", final=True)) + stopper.flush()
        rest = guide.taken(tail, final=not stopper.stopped) if guide else None
        if tail or rest:  # rest: tokens that decoded to no text of their own
            yield TextDelta(tail, rest)
        yield Finished(finish, len(tokens), produced, prompt_cache=self.cache_stats())

    def grammar_tokenizer(self):
        """llguidance's view of the vocabulary, built on the first request that needs it (~0.2 s)."""
        if self._lltokenizer is None:
            import warnings

            import llguidance.llamacpp

            with warnings.catch_warnings():  # llguidance calls a deprecated llama.cpp function once per token
                warnings.filterwarnings("ignore", message="llama_token_get_attr is deprecated")
                self._lltokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self.vocab)
        return self._lltokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _spells_control(self, text: str) -> bool:
        raw = text.encode("utf-8")
        return self.llm.tokenize(raw, add_bos=False, special=True) != self.llm.tokenize(
            raw, add_bos=False, special=False
        )

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if not self.options.get("embedding"):
            return super().embed(inputs)
        import math

        check_token_ids(inputs, self.llm.n_vocab(), self.spec.name)
        with self.lock:
            vectors, total = [], 0
            for item in inputs:
                # llama-cpp-python embeds text only: token ids go back to their text first.
                text = self.llm.detokenize(item).decode("utf-8", errors="replace") if isinstance(item, list) else item
                total += len(item) if isinstance(item, list) else len(self.tokenize(text))
                vector = self.llm.embed(text)
                if vector and isinstance(vector[0], list):  # per-token output: mean-pool it
                    vector = [sum(col) / len(vector) for col in zip(*vector, strict=True)]
                norm = math.sqrt(sum(v * v for v in vector)) or 1.0
                vectors.append([v / norm for v in vector])
        return vectors, total

    def info(self) -> dict[str, Any]:
        model = self.llm._model
        return {
            "backend": self.name,
            "device": "cuda" if self.gpu and self.options.get("n_gpu_layers", 0) != 0 else "cpu",
            "n_ctx": self.llm.n_ctx(),
            "n_threads": self.options.get("n_threads"),
            "extra_buffers": bool(getattr(self.llm.model_params, "use_extra_bufts", True)),
            "prompt_cache": self.cache_stats(),
            "chat_format": self.spec.chat_format
            or ("gguf" if self.llm.metadata.get("tokenizer.chat_template") else "chatml"),
            "n_params": model.n_params(),
            "file_bytes": os.path.getsize(self.spec.path),
            "embedding_length": self.llm.n_embd() if self.options.get("embedding") else None,
        }


class _Guide:
    """A grammar mask and logprob capture, run as llama.cpp's logits processor.

    The processor sees the raw logits in vocabulary order before penalties and sampling
    (the first stage of llama-cpp-python's sampler chain): logprobs are taken from
    them, then the tokens the grammar forbids are set to -inf.
    """

    def __init__(self, backend: LlamaCppBackend, request: GenerationRequest):
        self.backend = backend
        self.constraint = Constraint(backend.grammar_tokenizer(), request.grammar) if request.grammar else None
        self.top = request.logprobs
        self.logprobs = LogprobQueue()
        self.raw = None

    def process(self, _input_ids, logits):
        if self.top is not None:
            self.raw = np.array(logits, dtype=np.float32)
        if self.constraint is not None:
            logits[~self.constraint.allowed(len(logits))] = -np.inf
        return logits

    def accept(self, token: int, text: str) -> None:
        """The sampled token, and the text it decoded to."""
        if self.constraint is not None:
            self.constraint.consume(token)
        if self.top is not None and self.raw is not None:
            self.logprobs.add(logprob_entry(log_softmax(self.raw), token, self.top, self._piece), text)

    def taken(self, shown: str, final: bool = False) -> list[dict] | None:
        return self.logprobs.take(shown, final) if self.top is not None else None

    def _piece(self, token: int) -> bytes:
        return self.backend.llm.detokenize([token], special=True)

    @property
    def complete(self) -> bool:
        return self.constraint is not None and self.constraint.done
