"""The Python API: the magics' verbs for scripts and notebooks.

    import llm_nb
    llm_nb.load()                       # load the default model, or attach to it
    llm_nb.chat("Say hi in French")     # the reply's text; the conversation goes on
    for piece in llm_nb.chat("and in German?", stream=True):
        print(piece, end="")
    llm_nb.history()                    # the messages so far
    llm_nb.extract(Person, "Ada, 36, lives in London")  # a validated Person (see llm_nb.structured)
    reply = llm_nb.chat("Weather in Paris?", tools=[get_weather])
    reply.run_tools(); llm_nb.chat(tools=[get_weather])   # the calls run, then the answer from their results
    llm_nb.status()                     # what the host holds, for whom
    llm_nb.unload()

A ``Session`` is one process's view of the host: one ``Client`` (made on first
use, so importing costs nothing), the conversation per model, and the model in
use. The module-level functions and the magics share one default session, so
``%%llm_chat`` and ``llm_nb.chat`` continue the same conversation.

One thing a bare ``Client`` does not do is done here for every caller: a chat
with a model that is not loaded (or one lost with a host that died *before*
this call) loads it first, with a lease, and then asks again. A host that dies
*during* a call fails that call; only the next call starts a new host, and it
says so in one line (``Session.on_notice``, stderr by default). Models lost to a
host that the kernel's OOM killer ended less than a minute ago are not loaded
again by themselves: the error says why and what to do.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_MODEL
from .errors import InvalidRequest, LlmNbError, ModelLoading, ModelNotFound, print_notice
from .processes import OOM_HOLD_S
from .reply import ChatReply
from .results import LoadResult, Status, Undeployed, UnloadResult

if TYPE_CHECKING:  # the client pulls in requests; keep ``import llm_nb`` light
    from .client import ChatStream, Client

__all__ = [
    "ChatReply",
    "LoadResult",
    "Session",
    "Status",
    "Undeployed",
    "UnloadResult",
    "chat",
    "default_session",
    "extract",
    "history",
    "load",
    "panel",
    "status",
    "unload",
]


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["n_threads=4", "flash_attn=true"]`` -> ``{"n_threads": 4, "flash_attn": True}`` (JSON values, else text)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"--option takes KEY=VALUE, not {pair!r}; e.g. --option n_threads=4")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


class Session:
    """One process's link to the host: a client, conversations per model, the model in use."""

    def __init__(self, connection: str | None = None, *, autostart: bool = True):
        self.connection = connection
        self.autostart = autostart  # False: a call finds a host or fails, never starts one (``llm-nb ps``)
        self._client: Client | None = None
        self._lock = threading.RLock()
        self.conversations: dict[str, list[dict]] = {}
        self.model: str | None = None  # the model last loaded or chatted with
        # Models this session holds a lease on, with the pid of the host that gave it: a model
        # that vanishes from that same host was unloaded on purpose (force, the panel) and is
        # not silently loaded again; one lost with a host that died is.
        self.held: dict[str, int] = {}
        #: Where one-line notices go (a new host was started, ...); stderr unless a thread says otherwise.
        self.on_notice: Callable[[str], None] = print_notice
        self.notices: list[str] = []
        self._notice_target = threading.local()

    @property
    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                from .client import Client

                self._client = Client(self.connection, autostart=self.autostart, on_notice=self._notice)
            return self._client

    def _notice(self, message: str) -> None:
        self.notices.append(message)
        (getattr(self._notice_target, "handler", None) or self.on_notice)(message)

    @contextlib.contextmanager
    def notices_to(self, handler: Callable[[str], None]) -> Iterator[None]:
        """Within this ``with`` block, this thread's notices go to ``handler`` (the widget panel's notice line)."""
        previous = getattr(self._notice_target, "handler", None)
        self._notice_target.handler = handler
        try:
            yield
        finally:
            self._notice_target.handler = previous

    def current_model(self, model: str | None = None) -> str:
        """The one rule for which model a call means: the one named, else the one in use, else the default."""
        return model or self.model or DEFAULT_MODEL

    # --- verbs -------------------------------------------------------------------
    def load(
        self,
        model: str | None = None,
        *,
        name: str | None = None,
        backend: str | None = None,
        device: str | None = None,
        ctx: int | None = None,
        keep_alive: float | str | None = None,
        options: dict[str, Any] | None = None,
        on_progress: Callable[[dict], None] | None = None,
        **fields: Any,
    ) -> LoadResult:
        """Load ``model`` (default: the one in use, else smollm2) or attach to it; held until ``unload``."""
        options = dict(options or {})
        if device:
            options["device"] = device
        if ctx:
            options["n_ctx"] = int(ctx)
        started = time.perf_counter()
        result = LoadResult(
            self.client.load(
                self.current_model(model),
                name=name,
                backend=backend,
                options=options or None,
                keep_alive=keep_alive,
                on_progress=on_progress,
                **fields,
            )
        )
        result["round_trip_s"] = time.perf_counter() - started  # what the caller waited, HTTP included
        self.model = result["model"]["name"]
        self.held[self.model] = self.client.host_info()["pid"]
        return result

    def stream(
        self,
        prompt: str | None,
        model: str | None = None,
        *,
        system: str | None = None,
        new: bool = False,
        keep: bool = True,
        on_progress: Callable[[dict], None] | None = None,
        load_fields: dict[str, Any] | None = None,
        schema: Any = None,
        tools: list | None = None,
        tool_choice: Any = None,
        **params: Any,
    ) -> ChatReply:
        """Send ``prompt`` in the model's conversation and return the reply as it streams.

        ``new`` starts the conversation over; ``system`` sets its system message;
        ``keep=False`` sends the prompt alone and leaves the conversation as it is.
        ``load_fields`` (e.g. ``keep_alive``) apply when the model must be loaded first.
        ``schema`` (a pydantic model, dataclass, TypedDict, JSON-schema dict, or "json") makes the
        reply JSON of that shape, which ``reply.parse()`` validates. ``tools`` (Python functions or
        tool dicts) let the model ask for calls (``reply.tool_calls``); ``tool_choice`` is "auto",
        "required", "none" or one function. ``prompt=None`` answers the tool results just added.
        ``params`` go to the host as they are (max_tokens, temperature, seed, stop, ...).
        """
        model = self.current_model(model)
        last = (self.conversations.get(model) or [{}])[-1]
        answering = prompt is None and keep and not new and last.get("role") == "tool"
        if not answering and (not isinstance(prompt, str) or not prompt.strip()):
            hint = " (no prompt only answers tool results: run reply.run_tools() first)" if prompt is None else ""
            raise InvalidRequest(f"the message is empty: write what to ask the model{hint}")
        if new:
            self.clear(model)
        messages = list(self.conversations.get(model, [])) if keep else []
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": system})
            if keep:
                with self._lock:
                    conversation = self.conversations.setdefault(model, [])
                    conversation[:] = [m for m in conversation if m["role"] != "system"]
                    conversation.insert(0, {"role": "system", "content": system})
        user = None if answering else {"role": "user", "content": prompt}
        body = {"model": model, "messages": [*messages, user] if user else messages}
        parse_schema, functions = None, {}
        if schema is not None or tools or tool_choice is not None or params.get("response_format") is not None:
            from .structured import request_fields  # pydantic, only for the calls that need it

            fields, parse_schema, functions = request_fields(
                schema, tools, tool_choice, params.pop("response_format", None)
            )
            body.update(fields)
        body.update({k: v for k, v in params.items() if v is not None})
        stream = self._open(body, on_progress, load_fields or {})
        self.model = model
        return ChatReply(self, model, stream, user, keep, schema=parse_schema, functions=functions)

    def chat(self, prompt: str | None = None, model: str | None = None, *, stream: bool = False, **kwargs: Any) -> Any:
        """The reply's text; with ``stream=True`` an iterator of chunks (closing it stops the generation).

        With ``tools=`` the ``ChatReply`` (``text``, ``tool_calls``, ``run_tools()``); with ``schema=``
        the reply's value, validated (``StructuredOutputError``, with the ``raw`` text, when it does not fit).
        """
        reply = self.stream(prompt, model, **kwargs)
        if stream:
            return iter(reply)
        if kwargs.get("tools"):
            reply.read()
            return reply
        return reply.parse() if kwargs.get("schema") is not None else reply.read()

    def extract(
        self, schema: Any, text: str, model: str | None = None, *, instructions: str | None = None, **params: Any
    ) -> Any:
        """``schema`` (pydantic model, dataclass, TypedDict or JSON-schema dict) filled in from ``text``, validated.

        Greedy (temperature 0) and outside the conversation; the reply is constrained to the schema.
        """
        from .structured import EXTRACT_INSTRUCTIONS

        prompt = f"{instructions or EXTRACT_INSTRUCTIONS}\n\nText:\n{text}"
        params.setdefault("temperature", 0)
        return self.stream(prompt, model, keep=False, schema=schema, **params).parse()

    def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> UnloadResult:
        """Give up this process's lease (``force``: free the model for everyone).

        A model nobody holds stays warm for its keep-alive, then goes.
        """
        if not all:
            model = self.current_model(model)
        result = UnloadResult(self.client.unload(None if all else model, all=all, force=force))
        if all:
            self.held.clear()
        else:
            self.held.pop(model, None)
        if all or model == self.model:
            self.model = None
        return result

    def status(self) -> Status:
        return Status(self.client.status())

    def undeploy(self, name: str) -> Undeployed:
        """End deployment ``name``: its cleanup() runs, its worker ends, the models it leased are released."""
        return Undeployed(self.client.undeploy(name))

    def history(self, model: str | None = None, *, clear: bool = False) -> list[dict]:
        """The conversation with ``model`` (a copy); ``clear=True`` forgets it (every model's if none is named)."""
        with self._lock:
            if clear:
                if model is None:
                    self.conversations.clear()
                else:
                    self.conversations.pop(model, None)
                return []
            return [dict(m) for m in self.conversations.get(self.current_model(model), [])]

    def clear(self, model: str) -> None:
        with self._lock:
            self.conversations.pop(model, None)

    # --- plumbing ------------------------------------------------------------------
    def _append(self, model: str, *messages: dict) -> None:
        with self._lock:
            self.conversations.setdefault(model, []).extend(messages)

    def _open(self, body: dict, on_progress: Callable[[dict], None] | None, load_fields: dict) -> ChatStream:
        """Open the stream; load the model first, once, when the host does not have it."""
        client = self.client
        loaded = False
        while True:
            try:
                return client.chat_stream(body)
            except (ModelNotFound, ModelLoading) as exc:
                name = body["model"]
                if isinstance(exc, ModelNotFound) and name in self.held:
                    # Asked afresh: a host restarted on the same URL (a Hub's shared host) answers like the old one.
                    self._refuse_to_reload(name, client.host_info(refresh=True)["pid"], client.locator.previous_exit)
                if loaded:
                    raise
                loaded = True
                self.load(name, on_progress=on_progress, **load_fields)

    def _refuse_to_reload(self, name: str, host_pid: int, previous_exit: dict | None) -> None:
        """Raise when a model this session held must not be loaded again behind the user's back."""
        held_on = self.held[name]
        if held_on == host_pid:
            del self.held[name]
            raise ModelNotFound(
                f"{name} was unloaded from the host while this notebook held it (force-unloaded from the LLM "
                f"panel or by another client); run `%llm_load {name}` to load it again"
            ) from None
        if previous_exit and previous_exit.get("oom") and previous_exit.get("pid") == held_on:
            ago = time.time() - float(previous_exit.get("at") or 0)
            if ago < OOM_HOLD_S:
                del self.held[name]
                raise LlmNbError(
                    f"{name} was lost with the previous host (pid {held_on}), which the kernel's OOM killer ended "
                    f"{ago:.0f} s ago; it is not loaded again by itself, as it would meet the same memory pressure. "
                    f"Free memory (unload models, close notebooks that hold large data), then load it again with "
                    f"`%llm_load {name}` or `llm_nb.load({name!r})`",
                    code="host_oom_killed",
                    status=503,
                ) from None


_default: Session | None = None
_default_lock = threading.Lock()


def default_session() -> Session:
    """The session the magics, the panel and the module-level functions share."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Session()
        return _default


def load(model: str | None = None, **kwargs: Any) -> LoadResult:
    """Load ``model`` (default smollm2) or attach to it. See ``Session.load``."""
    return default_session().load(model, **kwargs)


def chat(prompt: str | None = None, model: str | None = None, *, stream: bool = False, **kwargs: Any) -> Any:
    """Ask ``model`` (default: the one in use, else smollm2), loading it if needed. See ``Session.chat``."""
    return default_session().chat(prompt, model, stream=stream, **kwargs)


def extract(schema: Any, text: str, model: str | None = None, *, instructions: str | None = None, **params: Any) -> Any:
    """A validated instance of ``schema`` extracted from ``text``. See ``Session.extract``."""
    return default_session().extract(schema, text, model, instructions=instructions, **params)


def unload(model: str | None = None, *, all: bool = False, force: bool = False) -> UnloadResult:
    return default_session().unload(model, all=all, force=force)


def status() -> Status:
    return default_session().status()


def history(model: str | None = None, *, clear: bool = False) -> list[dict]:
    return default_session().history(model, clear=clear)


def panel(**kwargs: Any):
    """The ipywidgets panel: live status, memory bar, load/unload, a small chat box."""
    from .widgets import Panel

    return Panel(default_session(), **kwargs)
