"""Client for the shared host: find it (or start it), then call it.

``Client`` is synchronous (requests) for magics, scripts and the CLI;
``AsyncClient`` is the same with aiohttp for code that already runs a loop.
Both raise ``llm_nb.errors`` exceptions whose messages say what failed and
what to do. Importing this module imports no model library.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from .config import DEFAULT_MODEL
from .connection import connection_path, live_host, read_connection
from .errors import HostUnavailable, LlmNbError, error_from_json

HOST_START_TIMEOUT_S = 60.0


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
    name = os.environ.get("LLM_NB_CLIENT_NAME") or notebook
    if not name:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        name = f"kernel {kernel_id[:8]}" if kernel_id else f"{prog} (pid {pid})"
    client_id = f"kernel:{kernel_id}" if kernel_id else f"pid:{pid}@{socket.gethostname()}"
    return {"id": client_id, "name": name, "pid": pid, "pid_started": psutil.Process(pid).create_time()}


def start_host(path: Path, timeout: float = HOST_START_TIMEOUT_S) -> dict:
    """Start a detached host for ``path`` unless one answers; one host even if many clients race."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with FileLock(str(path) + ".lock", timeout=timeout):
            info = live_host(path)
            if info is not None:
                return info
            log_path = path.with_suffix(".log")
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "llm_nb.host", "--connection-file", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a kernel interrupt or exit must not reach the host
                    close_fds=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = read_connection(path)
                if info and info.get("pid") == process.pid and live_host(path):
                    return info
                if process.poll() is not None:
                    break
                time.sleep(0.1)
            tail = log_path.read_text(errors="replace").splitlines()[-10:] if log_path.exists() else []
            if process.poll() is None:
                process.kill()
            raise HostUnavailable(
                f"the llm-nb host did not start (see {log_path}):\n"
                + "\n".join(tail)
                + "\nrun `llm-nb host` in a terminal to see why"
            )
    except Timeout:
        raise HostUnavailable(
            f"another process holds {path}.lock for more than {timeout:.0f} s; is a host starting?"
        ) from None


class ChatStream:
    """Iterate for text chunks; afterwards ``text``, ``usage``, ``finish_reason`` and timings are set."""

    def __init__(self, events: Iterator[dict], close: Callable[[], None], started: float | None = None):
        self._events = events
        self._close = close
        self.parts: list[str] = []
        self.usage: dict | None = None
        self.finish_reason: str | None = None
        self.started = started if started is not None else time.perf_counter()
        self.first_token_s: float | None = None
        self.elapsed_s: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._events:
                if "error" in chunk:
                    raise error_from_json(chunk, 500)
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                    if piece:
                        if self.first_token_s is None:
                            self.first_token_s = time.perf_counter() - self.started
                        self.parts.append(piece)
                        yield piece
        except requests.RequestException as exc:
            raise HostUnavailable(
                f"the llm-nb host went away in the middle of the reply ({type(exc).__name__}); "
                "the next call starts a new host, where the model must be loaded again"
            ) from exc
        finally:
            self.elapsed_s = time.perf_counter() - self.started
            self.close()
        if self.finish_reason is None:
            raise HostUnavailable("the reply ended before the model finished: the llm-nb host closed the stream")

    def close(self) -> None:
        """Stop reading: the host sees the connection close and cancels the generation."""
        self._close()


def _sse_data(lines: Iterator[bytes]) -> Iterator[dict]:
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chat_body(model: str | None, messages: list[dict] | str, params: dict[str, Any]) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model or DEFAULT_MODEL, "messages": messages}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _load_body(model, identity, **fields) -> dict:
    body = {"model": model or DEFAULT_MODEL, "client": identity}
    body.update({k: v for k, v in fields.items() if v is not None})
    key_env = body.get("api_key_env")
    if key_env and os.environ.get(key_env):
        # A remote's key set in this kernel's environment; the host keeps it in memory only.
        body["api_key"] = os.environ[key_env]
    return body


class Client:
    """Synchronous client. Finds the host from ``connection`` or ``$LLM_NB_CONNECTION``, else the per-user file."""

    def __init__(self, connection: str | os.PathLike | None = None, *, autostart: bool = True, timeout: float = 600.0):
        self.connection_file = connection_path(connection)
        self.autostart = autostart
        self.timeout = timeout
        self.session = requests.Session()
        self._info: dict | None = None
        self.identity = client_identity()

    # --- finding the host ----------------------------------------------------
    def host_info(self, refresh: bool = False) -> dict:
        if self._info is None or refresh:
            info = live_host(self.connection_file)
            if info is None:
                if not self.autostart:
                    raise HostUnavailable(
                        f"no llm-nb host answers for {self.connection_file}; start one with `llm-nb host`"
                    )
                info = start_host(self.connection_file)
            self._info = info
            self.session.headers["Authorization"] = f"Bearer {info['key']}"
        return self._info

    @property
    def url(self) -> str:
        return self.host_info()["url"]

    def _send(self, method: str, path: str, *, retry: bool = True, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        info = self.host_info()
        try:
            response = self.session.request(method, info["url"] + path, **kwargs)
        except requests.ConnectionError as exc:
            # The host is gone (killed, machine slept): find or start a new one once.
            if retry:
                self.host_info(refresh=True)
                return self._send(method, path, retry=False, **kwargs)
            raise HostUnavailable(f"the llm-nb host at {info['url']} does not answer: {exc}") from exc
        if response.status_code == 401 and retry:  # a new host with a new key took over the file
            self.host_info(refresh=True)
            return self._send(method, path, retry=False, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from_json(body, response.status_code)
        return response

    def _json(self, method: str, path: str, body: dict | None = None, **kwargs) -> dict:
        return self._send(method, path, json=body, **kwargs).json()

    # --- admin ---------------------------------------------------------------
    def status(self) -> dict:
        return self._json("GET", "/api/status")

    def catalog(self) -> dict[str, dict]:
        """The host's model aliases (built-in and user catalog), for pickers."""
        return self._json("GET", "/api/catalog")["models"]

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
        """Load ``model`` or attach to it; returns the model's status, ``attached`` and the lease."""
        body = _load_body(
            model, self.identity, name=name, backend=backend, options=options, keep_alive=keep_alive, **fields
        )
        if on_progress is None:
            return self._json("POST", "/api/models/load", body)
        return self._progress_stream("/api/models/load", body, on_progress, "load")

    def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> dict:
        body = {"model": model, "all": all, "force": force, "client": self.identity}
        return self._json("POST", "/api/models/unload", body)

    def logs(self, model: str, lines: int = 200) -> str:
        return self._send("GET", f"/api/models/{model}/logs", params={"lines": lines}).text

    def shutdown(self) -> dict:
        return self._json("POST", "/api/shutdown", {}, retry=False)

    # --- deployments and tokens ----------------------------------------------
    def deploy(self, name: str, folder: str | os.PathLike, on_progress: Callable[[dict], None] | None = None) -> dict:
        """Deploy a folder with model.py as ``/models/<name>/``; returns its metadata and the seconds it took."""
        body = {"name": name, "folder": str(Path(folder).expanduser().resolve())}
        if on_progress is None:
            return self._json("POST", "/api/deployments/deploy", body)
        return self._progress_stream("/api/deployments/deploy", body, on_progress, "deploy")

    def _progress_stream(self, path: str, body: dict, on_progress: Callable[[dict], None], what: str) -> dict:
        """POST with ``stream: true``: NDJSON progress events, then one ``done`` or ``error``."""
        with self._send("POST", path, json=dict(body, stream=True), stream=True) as response:
            for line in response.iter_lines():
                event = json.loads(line) if line else {}
                if event.get("event") == "progress":
                    on_progress(event)
                elif event.get("event") == "error":
                    raise error_from_json(event, event.get("status", 500))
                elif event.get("event") == "done":
                    return event
        raise HostUnavailable(f"the host closed the {what} stream without an answer")

    def undeploy(self, name: str) -> dict:
        return self._json("POST", "/api/deployments/undeploy", {"name": name})

    def deployments(self) -> list[dict]:
        return self._json("GET", "/api/deployments")["deployments"]

    def session_token(self, scope: str | list[str], ttl: float = 3600) -> dict:
        """A short-lived token that opens only ``scope`` (model or deployment names)."""
        return self._json("POST", "/api/token", {"scope": scope, "ttl": ttl})

    # --- OpenAI routes -------------------------------------------------------
    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def chat(self, messages: list[dict] | str, model: str | None = None, *, stream: bool = False, **params: Any):
        """A chat completion: the reply's text, or a ``ChatStream`` of chunks with ``stream=True``."""
        body = _chat_body(model, messages, params)
        if not stream:
            return self._json("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        return self.chat_stream(body)

    def chat_stream(self, body: dict) -> ChatStream:
        body = dict(body, stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        response = self._send("POST", "/v1/chat/completions", json=body, stream=True, retry=False)
        return ChatStream(_sse_data(response.iter_lines()), response.close, started)

    def complete(self, prompt: str, model: str | None = None, **params: Any) -> dict:
        body = {"model": model or DEFAULT_MODEL, "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return self._json("POST", "/v1/completions", body)

    def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        data = self._json("POST", "/v1/embeddings", {"model": model, "input": inputs})["data"]
        return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


class AsyncClient:
    """The same calls with aiohttp, for code inside an event loop."""

    def __init__(self, connection: str | os.PathLike | None = None, *, autostart: bool = True, timeout: float = 600.0):
        self.connection_file = connection_path(connection)
        self.autostart = autostart
        self.timeout = timeout
        self.identity = client_identity()
        self._session = None
        self._info: dict | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ready(self):
        import asyncio

        import aiohttp

        if self._info is None:
            info = await asyncio.to_thread(live_host, self.connection_file)
            if info is None:
                if not self.autostart:
                    raise HostUnavailable(f"no llm-nb host answers for {self.connection_file}")
                info = await asyncio.to_thread(start_host, self.connection_file)
            self._info = info
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._info['key']}"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session, self._info["url"]

    async def _request(self, method: str, path: str, body: dict | None = None):
        import aiohttp

        session, url = await self._ready()
        try:
            response = await session.request(method, url + path, json=body)
        except aiohttp.ClientConnectionError as exc:
            self._info = None
            raise HostUnavailable(f"the llm-nb host at {url} does not answer: {exc}") from exc
        if response.status >= 400:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = await response.text()
            response.release()
            raise error_from_json(payload, response.status)
        return response

    async def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        response = await self._request(method, path, body)
        async with response:
            return await response.json()

    async def status(self) -> dict:
        return await self._json("GET", "/api/status")

    async def load(self, model: str | None = None, **fields: Any) -> dict:
        return await self._json("POST", "/api/models/load", _load_body(model, self.identity, **fields))

    async def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> dict:
        return await self._json(
            "POST", "/api/models/unload", {"model": model, "all": all, "force": force, "client": self.identity}
        )

    async def chat(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> str:
        body = _chat_body(model, messages, params)
        data = await self._json("POST", "/v1/chat/completions", body)
        return data["choices"][0]["message"]["content"]

    async def chat_stream(
        self, messages: list[dict] | str, model: str | None = None, **params: Any
    ) -> AsyncIterator[str]:
        """Yield text chunks; breaking out of the loop cancels the generation on the host."""
        body = dict(_chat_body(model, messages, params), stream=True)
        response = await self._request("POST", "/v1/chat/completions", body)
        async with response:
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise error_from_json(chunk, 500)
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece

    async def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        data = (await self._json("POST", "/v1/embeddings", {"model": model, "input": inputs}))["data"]
        return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


__all__ = ["AsyncClient", "ChatStream", "Client", "LlmNbError", "client_identity", "start_host"]
