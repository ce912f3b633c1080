"""Client for the shared host: find it (or start it), then call it.

``Client`` is synchronous (requests) for magics, scripts and the CLI;
``AsyncClient`` is the same with aiohttp for code that already runs a loop.
Both are the host's verbs over ``llm_nb.transport`` (one set of rules for
auth, retries and errors) and ``llm_nb.streams`` (one stream parser); a
connection file names their host (``HostLocator``), or a URL and a credential
do (``Client.at``). Both raise ``llm_nb.errors`` exceptions whose messages say
what failed and what to do. Importing this module imports no model library.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from .catalog import catalog_entries, user_path
from .config import DEFAULT_MODEL, client_name
from .connection import connection_path
from .errors import HostUnavailable, LlmNbError
from .locator import FixedHost, HostLocator, Locator, hub_locator, spawn_host
from .streams import Reply, ReplyView, atext_pieces, text_pieces
from .transport import AsyncTransport, SyncTransport, nothing_sent


def client_identity() -> dict:
    """Who holds a lease: the kernel (or process), a readable name, and a pid the host can watch."""
    import psutil

    pid = os.getpid()
    kernel_id = None
    if "ipykernel" in sys.modules:  # only ask a kernel that is already there; never import it
        try:
            from ipykernel import get_connection_file

            kernel_id = Path(get_connection_file()).stem.removeprefix("kernel-")
        except Exception:  # not running inside a kernel after all
            kernel_id = None
    notebook = os.environ.get("JPY_SESSION_NAME")
    name = client_name() or notebook
    if not name:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        name = f"kernel {kernel_id[:8]}" if kernel_id else f"{prog} (pid {pid})"
    client_id = f"kernel:{kernel_id}" if kernel_id else f"pid:{pid}@{socket.gethostname()}"
    identity = {
        "id": client_id,
        "name": name,
        "pid": pid,
        "pid_started": psutil.Process(pid).create_time(),
        "hostname": socket.gethostname(),
    }
    if "JUPYTERHUB_API_TOKEN" in os.environ:  # which of the user's servers: its leases end with it
        identity["server"] = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
    return identity


class ChatStream(ReplyView):
    """Iterate for text chunks; afterwards ``text``, ``usage``, ``finish_reason`` and timings are set."""

    def __init__(self, lines: Iterator[bytes], close: Callable[[], None], started: float | None = None):
        self._lines = lines
        self._close = close
        self.reply = Reply(started)

    def __iter__(self) -> Iterator[str]:
        try:
            yield from text_pieces(self._lines, self.reply)
        finally:
            self.reply.end()
            self.close()
        _check_finished(self.reply)

    def read(self) -> str:
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop reading: the host sees the connection close and cancels the generation."""
        self._close()


def _check_finished(reply: Reply) -> None:
    if not reply.finished:
        raise HostUnavailable("the reply ended before the model finished: the llm-nb host closed the stream")


def _model(model: str | None) -> str:
    """A call that names no model means the default one (``Session`` decides which model is *in use*)."""
    return model or DEFAULT_MODEL


def _chat_body(model: str | None, messages: list[dict] | str, params: dict[str, Any]) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": _model(model), "messages": messages}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _stream_body(body: dict) -> dict:
    return dict(body, stream=True, stream_options={"include_usage": True})


def _caller_path(model: str) -> str:
    """A relative path that exists here, made absolute: the host's working directory is not the caller's."""
    path = user_path(model)
    if path.is_absolute() or not path.exists():
        return model
    try:
        if model in catalog_entries():  # an alias wins, on the host too
            return model
    except LlmNbError:  # a broken catalog: the host says so on load
        pass
    return str(path.resolve())


def _load_body(model, identity, **fields) -> dict:
    model = _model(model)
    # A remote model's MODEL is its name here, never a path.
    body = {"model": model if fields.get("backend") == "remote" else _caller_path(model), "client": identity}
    body.update({k: v for k, v in fields.items() if v is not None})
    key_env = body.get("api_key_env")
    if key_env and os.environ.get(key_env):
        # A remote's key set in this kernel's environment; the host keeps it in memory only.
        body["api_key"] = os.environ[key_env]
    return body


def _embeddings(answer: dict) -> list[list[float]]:
    return [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]


class _Made:
    """How both clients are made: from a connection file (found or started), or ``at`` a URL with a credential."""

    def __init__(
        self,
        connection: str | os.PathLike | None = None,
        *,
        autostart: bool = True,
        timeout: float = 600.0,
        on_notice: Callable[[str], None] | None = None,
        locator: Locator | None = None,
    ):
        if locator is None and connection is None:  # in a user's server of a Hub with a shared host: that one
            locator = hub_locator(on_notice)
        super().__init__(locator or HostLocator(connection_path(connection), autostart, on_notice), timeout)
        self.identity = client_identity()

    @classmethod
    def at(cls, url: str, credential: str, **kwargs: Any):
        """A client of the host at ``url`` with a key or session token: never starts or replaces a host."""
        return cls(locator=FixedHost(url, credential), **kwargs)

    @property
    def connection_file(self) -> Path | None:
        return getattr(self.locator, "connection_file", None)


class Client(_Made, SyncTransport):
    """Synchronous client. Finds the host from ``connection`` or ``$LLM_NB_CONNECTION``, else the per-user file.

    ``on_notice`` receives one line when this client finds that its host was
    replaced (default: printed to stderr as ``llm-nb: ...``).
    """

    # --- admin ---------------------------------------------------------------
    def status(self) -> dict:
        return self.call("GET", "/api/status")

    def catalog(self) -> dict[str, dict]:
        """The host's model aliases (built-in and user catalog), for pickers."""
        return self.call("GET", "/api/catalog")["models"]

    def load(
        self,
        model: str | None = None,
        *,
        name: str | None = None,
        backend: str | None = None,
        options: dict | None = None,
        keep_alive: float | str | None = None,
        on_progress: Callable[[dict], None] | None = None,
        **fields: Any,
    ) -> dict:
        """Load ``model`` or attach to it; returns the model's status, ``attached`` and the lease.

        Always read as a progress stream, so that a long load is never a silent connection.
        """
        body = _load_body(
            model, self.identity, name=name, backend=backend, options=options, keep_alive=keep_alive, **fields
        )
        return self.progress("/api/models/load", body, on_progress)

    def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> dict:
        body = {"model": model, "all": all, "force": force, "client": self.identity}
        return self.call("POST", "/api/models/unload", body)

    def logs(self, model: str, lines: int = 200) -> str:
        return self.send("GET", f"/api/models/{model}/logs", params={"lines": lines}).text

    def shutdown(self) -> dict:
        return self.call("POST", "/api/shutdown", {}, retry=False)

    # --- deployments and tokens ----------------------------------------------
    def deploy(
        self,
        name: str,
        folder: str | os.PathLike,
        on_progress: Callable[[dict], None] | None = None,
        engine: str = "local",
        **engine_options: Any,
    ) -> dict:
        """Deploy a folder with model.py as ``/models/<name>/``; returns its metadata and the seconds it took.

        ``engine_options`` (engine="ray"): ``replicas``, ``autoscaling``, ``ray_actor_options``,
        ``wait_for_resources``.
        """
        body = {"name": name, "folder": str(Path(folder).expanduser().resolve()), "engine": engine}
        body.update({k: v for k, v in engine_options.items() if v is not None})
        return self.progress("/api/deployments/deploy", body, on_progress)

    def undeploy(self, name: str) -> dict:
        return self.call("POST", "/api/deployments/undeploy", {"name": name})

    def deployments(self) -> list[dict]:
        return self.call("GET", "/api/deployments")["deployments"]

    def session_token(self, scope: str | list[str], ttl: float = 3600) -> dict:
        """A short-lived token that opens only ``scope`` (model or deployment names)."""
        return self.call("POST", "/api/token", {"scope": scope, "ttl": ttl})

    # --- OpenAI routes -------------------------------------------------------
    def models(self) -> list[dict]:
        return self.call("GET", "/v1/models")["data"]

    def chat(self, messages: list[dict] | str, model: str | None = None, *, stream: bool = False, **params: Any):
        """A chat completion: the reply's text, or a ``ChatStream`` of chunks with ``stream=True``.

        Either way it is read as a stream, so a host that dies or hangs is an error within seconds.
        """
        reply = self.chat_stream(_chat_body(model, messages, params))
        return reply if stream else reply.read()

    def chat_stream(self, body: dict) -> ChatStream:
        started = time.perf_counter()
        lines, close = self.lines("/v1/chat/completions", _stream_body(body))
        return ChatStream(lines, close, started)

    def chat_completion(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> dict:
        """The whole OpenAI answer (``choices``, ``usage``), not streamed."""
        return self.call("POST", "/v1/chat/completions", _chat_body(model, messages, params))

    def complete(self, prompt: str, model: str | None = None, **params: Any) -> dict:
        body = {"model": _model(model), "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return self.call("POST", "/v1/completions", body)

    def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        return _embeddings(self.call("POST", "/v1/embeddings", {"model": model, "input": inputs}))


class AsyncChatStream(ReplyView):
    """``async for`` text chunks; afterwards ``text``, ``usage``, ``finish_reason`` and timings are set.

    Leaving the loop early (``break``, cancellation) closes the stream: the host cancels the generation.
    """

    def __init__(self, client: AsyncClient, body: dict):
        self._client = client
        self._body = _stream_body(body)
        self.reply = Reply()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        self.reply = Reply()
        lines = self._client.lines("/v1/chat/completions", self._body)
        try:
            async for piece in atext_pieces(lines, self.reply):
                yield piece
        finally:
            self.reply.end()
            await lines.aclose()
        _check_finished(self.reply)

    async def read(self) -> str:
        async for _ in self:
            pass
        return self.text


class AsyncClient(_Made, AsyncTransport):
    """The same calls with aiohttp, for code inside an event loop; the same rules for finding the host."""

    async def status(self) -> dict:
        return await self.call("GET", "/api/status")

    async def load(
        self, model: str | None = None, *, on_progress: Callable[[dict], None] | None = None, **fields: Any
    ) -> dict:
        """Load ``model`` or attach to it; read as a progress stream, so a long load is never a silent connection."""
        return await self.progress("/api/models/load", _load_body(model, self.identity, **fields), on_progress)

    async def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> dict:
        return await self.call(
            "POST", "/api/models/unload", {"model": model, "all": all, "force": force, "client": self.identity}
        )

    async def chat(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> str:
        """The reply's text; read as a stream, so a host that dies or hangs is an error within seconds."""
        return await self.chat_stream(messages, model, **params).read()

    def chat_stream(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> AsyncChatStream:
        """``async for`` text chunks; breaking out of the loop cancels the generation on the host."""
        return AsyncChatStream(self, _chat_body(model, messages, params))

    async def chat_completion(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> dict:
        return await self.call("POST", "/v1/chat/completions", _chat_body(model, messages, params))

    async def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        return _embeddings(await self.call("POST", "/v1/embeddings", {"model": model, "input": inputs}))


__all__ = [
    "AsyncChatStream",
    "AsyncClient",
    "ChatStream",
    "Client",
    "FixedHost",
    "HostLocator",
    "LlmNbError",
    "client_identity",
    "nothing_sent",
    "spawn_host",
]
