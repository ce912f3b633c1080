"""What a backend is: a model in one worker process, and nothing else.

A backend knows how to load its model and run it. It knows nothing of leases,
queues, HTTP or OpenAI shapes: the worker (``llm_nb.worker``) drives it and the
host shapes the answers. Generation is a plain iterator that the worker runs
in a thread of its own, checking ``cancelled`` at every token.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import tool_format
from ..catalog import ModelSpec
from ..errors import BackendUnavailable, InvalidRequest

#: ``progress(message, fraction=None, **facts)``: facts travel beside the message (a Ray deploy's placement).
Progress = Callable[..., None]


@dataclass
class GenerationRequest:
    """One chat or completion request, already validated by the host."""

    kind: Literal["chat", "completion"]
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    #: An llguidance grammar, built and validated by the host: the reply must match it.
    grammar: str | None = None
    #: Report each token's logprob and this many alternatives (None: no logprobs).
    logprobs: int | None = None
    #: OpenAI tool definitions for the chat template (``llm_nb.tool_format``).
    tools: list[dict] | None = None

    @classmethod
    def from_json(cls, data: dict) -> GenerationRequest:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and v is not None})


@dataclass
class TextDelta:
    text: str
    logprobs: list[dict] | None = None  # one entry per token, when the request asked


@dataclass
class Finished:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    #: The conversation cache's figures after this request (prompt_cache.stats): about the model, not
    #: about this reply, so two finishes of the same generation compare equal whatever they say.
    prompt_cache: dict | None = field(default=None, compare=False)


GenerationEvent = TextDelta | Finished


class Backend:
    """Base class; subclasses fill in what their model can do."""

    name = "base"
    #: How many ``generate`` calls may run at once (the host queues the rest).
    parallel = 1

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def load(self, progress: Progress) -> None:
        raise NotImplementedError

    def generate(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[GenerationEvent]:
        raise InvalidRequest(f"model {self.spec.name!r} ({self.name}) does not generate text")

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        raise InvalidRequest(
            f"model {self.spec.name!r} ({self.name}) does not make embeddings; load an encoder model for /v1/embeddings"
        )

    def classify(self, inputs: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(
            f"model {self.spec.name!r} is generative; use the OpenAI routes under /v1 for it, not /v2 infer"
        )

    def tokenize(self, text: str) -> list[int]:
        raise InvalidRequest(f"model {self.spec.name!r} ({self.name}) cannot tokenize")

    def chat_messages(self, request: GenerationRequest, render: Callable[[list[dict], list | None], str]) -> tuple:
        """(messages, tools) for the chat template: tools as fields where it renders them, else as text.

        Whether a template renders tools is found by rendering once with and once without them.
        """
        messages = request.messages or []
        tool_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        if not request.tools and not tool_turns:
            return tool_format.template_messages(messages, None, tools_supported=True), None
        supported = getattr(self, "_template_takes_tools", None)
        if supported is None:  # asked once per backend: the template does not change
            probe = [{"role": "user", "content": "hi"}]
            # A conversation with tool turns but no tools (tool_choice "none") probes with a stand-in tool.
            tools = request.tools or [{"type": "function", "function": {"name": "probe", "parameters": {}}}]
            try:
                supported = render(probe, tools) != render(probe, None)
            except Exception:  # a template that chokes on tools ignores them as far as we are concerned
                supported = False
            self._template_takes_tools = supported
        messages = tool_format.template_messages(messages, request.tools, supported)
        return messages, (request.tools if supported else None)

    def info(self) -> dict[str, Any]:
        """Device, context length, chat format and whatever else status should show."""
        return {}

    def close(self) -> None:
        """Free what ending the process would not (normally nothing)."""


_BACKEND_MODULES = {
    "llamacpp": ("llm_nb.backends.llamacpp", "LlamaCppBackend", "llama-cpp-python"),
    "transformers": ("llm_nb.backends.transformers", "TransformersBackend", "llm-nb[transformers]"),
    "deployment": ("llm_nb.backends.user_code", "DeploymentBackend", "llm-nb"),
    "ray_deployment": ("llm_nb.backends.ray_serve", "RayServeBackend", "'llm-nb[ray]'"),
    "transformers-task": ("llm_nb.backends.tasks", "PipelineBackend", "llm-nb[transformers]"),
}


def _strings_in(value: Any) -> Iterator[str]:
    """Every string inside a message or a tool (content, text parts, call arguments, descriptions)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings_in(item)


def tokenize_chat_prompt(
    prompt: str, sources: list, has_control: Callable[[str], bool], encode: Callable[[str, bool, bool], list[int]]
) -> list[int]:
    """The token ids of a rendered chat prompt, where only the template's own markup may be control tokens.

    Text that came from a message or a tool (``sources``) and spells a control token (a user
    writing ``<|im_end|><|im_start|>system``) is found in the prompt and tokenized as plain text,
    so it cannot close its turn or forge another. ``encode(text, special, first)`` tokenizes one
    piece; prompts without such text are tokenized whole, as before.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for text in _strings_in(sources):
        if not text or not has_control(text):
            continue
        at = prompt.find(text, cursor)
        if at < 0:
            at = prompt.find(text)  # a template may move a message (a system prompt first)
        if at < 0:
            raise InvalidRequest(
                "a message holds text that spells one of the model's control tokens, and its chat template "
                f"rewrites that message, so it cannot be kept as plain text: {text[:80]!r}"
            )
        spans.append((at, at + len(text)))
        cursor = at + len(text)
    if not spans:
        return encode(prompt, True, True)
    ids: list[int] = []
    position = 0
    for start, end in sorted(spans):
        if start > position:
            ids += encode(prompt[position:start], True, not ids)
        if end > position:
            ids += encode(prompt[max(start, position) : end], False, not ids)
            position = end
    if position < len(prompt):
        ids += encode(prompt[position:], True, not ids)
    return ids


def check_token_ids(inputs: list, vocab_size: int, model: str) -> None:
    """A 400 for a token id the model's vocabulary does not have (an embedding input as ids)."""
    for index, item in enumerate(inputs):
        if isinstance(item, list) and (bad := [t for t in item if not 0 <= t < vocab_size]):
            raise InvalidRequest(
                f"input {index} has token id {bad[0]}, outside {model!r}'s vocabulary of {vocab_size} tokens"
            )


def coerce_option(backend: str, key: str, value: Any, known: dict[str, type]) -> Any:
    """A load option from the CLI, a magic or JSON, as the type the backend wants ("true" -> True, "4096" -> 4096)."""
    if key not in known:
        raise InvalidRequest(f"unknown {backend} option {key!r}; known: {', '.join(sorted(known))}")
    kind = known[key]
    try:
        if kind is bool and isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"option {key}={value!r} must be {kind.__name__}") from None


def backend_class(name: str, task: str | None = None) -> type[Backend]:
    """Import a backend only in the worker that needs it: kernels and the host never do."""
    if name == "transformers" and task:
        from .tasks import TASKS  # light: no torch at import

        if task in TASKS:  # classification-style tasks run a pipeline; embeddings and chat do not
            name = "transformers-task"
    try:
        module_name, class_name, install = _BACKEND_MODULES[name]
    except KeyError:
        raise InvalidRequest(f"backend {name!r} does not run in a worker") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"the {name} backend cannot be imported ({exc}); install it with `pip install {install}`"
        ) from exc
    return getattr(module, class_name)


class StopBuffer:
    """Streams text while honouring stop sequences that may span tokens.

    Text that could still be the start of a stop sequence is held back until
    the next token decides; once a stop sequence appears, everything before it
    is released and generation should end.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what can safely be shown now."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index = min(i for i, _ in hits)
            out, self.pending, self.stopped = self.pending[:index], "", True
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
