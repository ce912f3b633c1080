"""llama.cpp backend (llama-cpp-python): GGUF files, CPU or CUDA.

The generation loop is ours rather than ``create_chat_completion``'s, so that
the worker sees every token: cancellation is checked per token, usage is
counted exactly in streaming too, and a prompt longer than the context is an
error rather than a silent truncation.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import threading
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
from .llamacpp_context import ContextConversations

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
        self.conversations = ContextConversations(self.llm, options.get("cache_bytes"))
        progress("ready", 1.0)

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
            if self.conversations.cache.enabled:
                self.conversations.prepare(tokens)
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
        yield Finished(finish, len(tokens), produced, prompt_cache=self.conversations.stats())

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
            "prompt_cache": self.conversations.stats(),
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
