"""Client for the shared host: find it (or start it), then call it.

``Client`` is synchronous (requests) for magics, scripts and the CLI;
``AsyncClient`` is the same with aiohttp for code that already runs a loop.
Both raise ``llm_nb.errors`` exceptions whose messages say what failed and
what to do. Importing this module imports no model library.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from .config import DEFAULT_MODEL, stream_read_timeout
from .connection import connection_path, live_host, pid_alive, read_connection
from .errors import HostUnavailable, LlmNbError, error_from_json, print_notice
from .processes import how_host_ended, tail
from .streams import Reply, ReplyView

HOST_START_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


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


def spawn_host(path: Path, timeout: float = HOST_START_TIMEOUT_S) -> tuple[dict, bool]:
    """The live host of ``path``, starting one if none answers: ``(info, started_here)``.

    Under the file lock, so that many clients racing get one host. The host runs
    under ``llm_nb.launcher``, detached from this process (a kernel interrupt or
    exit must not reach it), which records how it ends for the next client.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with FileLock(str(path) + ".lock", timeout=timeout):
            info = live_host(path)
            if info is not None:
                return info, False
            log_path = path.with_suffix(".log")
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "llm_nb.launcher", "--connection-file", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a kernel interrupt or exit must not reach the host
                    close_fds=True,
                )
            _reap_in_background(process)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = read_connection(path)
                if info and pid_alive(info.get("pid")) and live_host(path):
                    return info, True
                if process.poll() is not None:
                    break
                time.sleep(0.1)
            if process.poll() is None:
                process.kill()
            raise HostUnavailable(
                f"the llm-nb host did not start (see {log_path}):\n"
                + tail(log_path, 10)
                + "\nrun `llm-nb host` in a terminal to see why"
            )
    except Timeout:
        raise HostUnavailable(
            f"another process holds {path}.lock for more than {timeout:.0f} s; is a host starting?"
        ) from None


def _reap_in_background(process: subprocess.Popen) -> None:
    """Wait on the launcher from a daemon thread, so that it never lingers as a zombie of this process."""
    threading.Thread(target=process.wait, name="llm-nb-launcher-reaper", daemon=True).start()


def start_host(path: Path, timeout: float = HOST_START_TIMEOUT_S) -> dict:
    """Start a detached host for ``path`` unless one answers; one host even if many clients race."""
    return spawn_host(path, timeout)[0]


def _caused_by(exc: BaseException, kinds: tuple[type, ...]) -> bool:
    """True if ``exc`` or anything it wraps (args, ``reason``, cause, context) is one of ``kinds``.

    requests and aiohttp wrap the socket's own error a few layers deep.
    """
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        stack.extend(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException))
        stack.extend([getattr(current, "reason", None), current.__cause__, current.__context__])
    return False


def nothing_sent(exc: BaseException) -> bool:
    """True when a request failed before it reached the host: the connection was refused or never made.

    Only then may a client start a new host and send the request again; a request
    that was sent may have been acted on (a load begun, tokens generated).
    """
    from urllib3.exceptions import NewConnectionError

    aiohttp = sys.modules.get("aiohttp")  # an aiohttp error can only come from code that imported it
    refused: tuple[type, ...] = (ConnectionRefusedError, NewConnectionError, requests.exceptions.ConnectTimeout)
    if aiohttp is not None:
        refused += (aiohttp.ClientConnectorError,)
    return _caused_by(exc, refused)


class HostLocator:
    """Finds the host of one connection file, and says what became of the one before.

    A host is started here only when none answers *before* a request is sent
    (no connection file, a stale one, a refused connection); a host that dies
    while a request runs makes that request fail (``lost``), never a new host.
    """

    def __init__(self, connection_file: Path, autostart: bool, on_notice: Callable[[str], None] | None = None):
        self.connection_file = connection_file
        self.autostart = autostart
        self.on_notice = on_notice or print_notice
        self.info: dict | None = None
        #: How the host before the current one ended (its exit record), when this client saw it go.
        self.previous_exit: dict | None = None
        self.notices: list[str] = []
        self._lock = threading.Lock()

    def find(self, refresh: bool = False) -> dict:
        with self._lock:
            # A host whose process is gone is found missing here, before anything is sent (so a pooled
            # connection to it is never tried, which would look like a call the host died under).
            if self.info is not None and not refresh and pid_alive(self.info.get("pid")):
                return self.info
            previous = self.info or read_connection(self.connection_file)
            info = live_host(self.connection_file)
            started = False
            if info is None:
                if not self.autostart:
                    raise HostUnavailable(
                        f"no llm-nb host answers for {self.connection_file}; start one with `llm-nb host`"
                    )
                info, started = spawn_host(self.connection_file)
            if previous is not None and previous.get("pid") != info.get("pid"):
                self._replaced(previous, info, started)
            self.info = info
            return info

    def _replaced(self, previous: dict, info: dict, started: bool) -> None:
        pid = previous.get("pid")
        how, record = how_host_ended(self.connection_file, pid, wait=1.0)
        self.previous_exit = dict(record or {"pid": pid}, reason=how, replaced_at=time.time())
        if started:
            message = f"started a new host (pid {info['pid']}): the previous one (pid {pid}) {how}"
        else:
            message = f"a new host (pid {info['pid']}) took over: the previous one (pid {pid}) {how}"
        self.notices.append(message)
        self.on_notice(message)

    def lost(self, info: dict, exc: BaseException) -> HostUnavailable:
        """The error for a request whose host stopped answering after it was sent."""
        pid = info.get("pid")
        if _read_timed_out(exc) and pid_alive(pid):
            return HostUnavailable(
                f"the llm-nb host (pid {pid}) sent nothing for {stream_read_timeout():.0f} s, not even a heartbeat: "
                "it is hung or overloaded; the call was given up. `llm-nb logs` and the host log say more; "
                "`llm-nb stop` ends it, and the next call starts a new one",
                pid=pid,
            )
        deadline = time.monotonic() + 1.0  # a killed process may take a moment to be gone
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid):
            return HostUnavailable(
                f"the connection to the llm-nb host (pid {pid}) broke during this call ({type(exc).__name__}); "
                "the host still runs: try the call again",
                pid=pid,
            )
        how, record = how_host_ended(self.connection_file, pid, wait=0.5)
        return HostUnavailable(
            f"the llm-nb host (pid {pid}) {how} during this call; it was not restarted inside the call. "
            "The next call starts a new host, where models must be loaded again",
            pid=pid,
            oom=bool(record and record.get("oom")) or None,
        )


def _read_timed_out(exc: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError

    return _caused_by(exc, (ReadTimeoutError, requests.exceptions.ReadTimeout, TimeoutError))


class ChatStream(ReplyView):
    """Iterate for text chunks; afterwards ``text``, ``usage``, ``finish_reason`` and timings are set."""

    def __init__(
        self,
        events: Iterator[bytes],
        close: Callable[[], None],
        started: float | None = None,
        lost: Callable[[BaseException], LlmNbError] | None = None,
    ):
        self._lines = events
        self._close = close
        self._lost = lost
        self.reply = Reply(started)

    def __iter__(self) -> Iterator[str]:
        try:
            for raw in self._lines:
                piece = self.reply.take_line(raw)
                if piece is None:
                    break
                if piece:
                    yield piece
        except requests.RequestException as exc:
            if self._lost is not None:
                raise self._lost(exc) from exc
            raise HostUnavailable(f"the llm-nb host went away in the middle of the reply ({exc})") from exc
        finally:
            self.reply.end()
            self.close()
        if not self.reply.finished:
            raise HostUnavailable("the reply ended before the model finished: the llm-nb host closed the stream")

    def read(self) -> str:
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        """Stop reading: the host sees the connection close and cancels the generation."""
        self._close()


def _chat_body(model: str | None, messages: list[dict] | str, params: dict[str, Any]) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = {"model": model or DEFAULT_MODEL, "messages": messages}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _stream_body(body: dict) -> dict:
    return dict(body, stream=True, stream_options={"include_usage": True})


def _load_body(model, identity, **fields) -> dict:
    body = {"model": model or DEFAULT_MODEL, "client": identity}
    body.update({k: v for k, v in fields.items() if v is not None})
    key_env = body.get("api_key_env")
    if key_env and os.environ.get(key_env):
        # A remote's key set in this kernel's environment; the host keeps it in memory only.
        body["api_key"] = os.environ[key_env]
    return body


def _progress_event(line: bytes, on_progress: Callable[[dict], None] | None) -> dict | None:
    """One line of a load or deploy stream: progress is handed on, an error raised, the answer returned.

    Blank lines are the host's heartbeats.
    """
    event = json.loads(line) if line.strip() else {}
    if event.get("event") == "progress":
        if on_progress is not None:
            on_progress(event)
    elif event.get("event") == "error":
        raise error_from_json(event, event.get("status", 500))
    elif event.get("event") == "done":
        return {k: v for k, v in event.items() if k != "event"}
    return None


def _no_answer(what: str) -> HostUnavailable:
    return HostUnavailable(f"the host closed the {what} stream without an answer")


class _HostClient:
    """What both clients hold: the connection file, the host locator, and who is asking."""

    def __init__(
        self,
        connection: str | os.PathLike | None = None,
        *,
        autostart: bool = True,
        timeout: float = 600.0,
        on_notice: Callable[[str], None] | None = None,
    ):
        self.connection_file = connection_path(connection)
        self.autostart = autostart
        self.timeout = timeout
        self.locator = HostLocator(self.connection_file, autostart, on_notice)
        self.identity = client_identity()


class Client(_HostClient):
    """Synchronous client. Finds the host from ``connection`` or ``$LLM_NB_CONNECTION``, else the per-user file.

    ``on_notice`` receives one line when this client finds that its host was
    replaced (default: printed to stderr as ``llm-nb: ...``).
    """

    def __init__(self, connection: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(connection, **kwargs)
        self.session = requests.Session()

    # --- finding the host ----------------------------------------------------
    def host_info(self, refresh: bool = False) -> dict:
        info = self.locator.find(refresh)
        self.session.headers["Authorization"] = f"Bearer {info['key']}"
        return info

    @property
    def url(self) -> str:
        return self.host_info()["url"]

    def _send(self, method: str, path: str, *, retry: bool = True, stream: bool = False, **kwargs) -> requests.Response:
        # A stream is never silent for long (the host sends heartbeats), so its reads time out soon;
        # a plain request may wait for its whole answer.
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, stream_read_timeout() if stream else self.timeout))
        info = self.host_info()
        try:
            response = self.session.request(method, info["url"] + path, stream=stream, **kwargs)
        except requests.RequestException as exc:
            if retry and nothing_sent(exc):
                # Nothing reached the host (it is gone): find the one that took over, or start one, once.
                self.host_info(refresh=True)
                return self._send(method, path, retry=False, stream=stream, **kwargs)
            raise self.locator.lost(info, exc) from exc
        if response.status_code == 401 and retry:  # a new host with a new key took over the file
            response.close()
            self.host_info(refresh=True)
            return self._send(method, path, retry=False, stream=stream, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise error_from_json(body, response.status_code)
        return response

    def _json(self, method: str, path: str, body: dict | None = None, **kwargs) -> dict:
        return self._send(method, path, json=body, **kwargs).json()

    def _progress_stream(self, path: str, body: dict, on_progress: Callable[[dict], None] | None) -> dict:
        """POST with ``stream: true``: progress lines, then the answer; a host that dies mid-stream is an error."""
        with self._send("POST", path, json=dict(body, stream=True), stream=True) as response:
            info = self.locator.info
            try:
                for line in response.iter_lines():
                    answer = _progress_event(line, on_progress)
                    if answer is not None:
                        return answer
            except requests.RequestException as exc:
                raise self.locator.lost(info, exc) from exc
        raise _no_answer(path)

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
        """Load ``model`` or attach to it; returns the model's status, ``attached`` and the lease.

        Always read as a progress stream, so that a long load is never a silent connection.
        """
        body = _load_body(
            model, self.identity, name=name, backend=backend, options=options, keep_alive=keep_alive, **fields
        )
        return self._progress_stream("/api/models/load", body, on_progress)

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
        return self._progress_stream("/api/deployments/deploy", body, on_progress)

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
        """A chat completion: the reply's text, or a ``ChatStream`` of chunks with ``stream=True``.

        Either way it is read as a stream, so a host that dies or hangs is an error within seconds.
        """
        reply = self.chat_stream(_chat_body(model, messages, params))
        return reply if stream else reply.read()

    def chat_stream(self, body: dict) -> ChatStream:
        started = time.perf_counter()
        response = self._send("POST", "/v1/chat/completions", json=_stream_body(body), stream=True)
        info = self.locator.info
        return ChatStream(response.iter_lines(), response.close, started, lost=lambda exc: self.locator.lost(info, exc))

    def complete(self, prompt: str, model: str | None = None, **params: Any) -> dict:
        body = {"model": model or DEFAULT_MODEL, "prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return self._json("POST", "/v1/completions", body)

    def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        data = self._json("POST", "/v1/embeddings", {"model": model, "input": inputs})["data"]
        return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


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
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=stream_read_timeout())
        self.reply = Reply()
        response, info = await self._client._request("POST", "/v1/chat/completions", self._body, timeout=timeout)
        try:
            async with response:
                async for raw in response.content:
                    piece = self.reply.take_line(raw)
                    if piece is None:
                        break
                    if piece:
                        yield piece
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise await asyncio.to_thread(self._client.locator.lost, info, exc) from exc
        finally:
            self.reply.end()
        if not self.reply.finished:
            raise HostUnavailable("the reply ended before the model finished: the llm-nb host closed the stream")

    async def read(self) -> str:
        async for _ in self:
            pass
        return self.text


class AsyncClient(_HostClient):
    """The same calls with aiohttp, for code inside an event loop; the same rules for finding the host."""

    def __init__(self, connection: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(connection, **kwargs)
        self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def host_info(self, refresh: bool = False) -> dict:
        return await asyncio.to_thread(self.locator.find, refresh)

    async def _request(self, method: str, path: str, body: dict | None = None, *, timeout=None, retry: bool = True):
        """Send one request: ``(response, host info)``; the same retry rules as ``Client._send``."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        info = await self.host_info()
        try:
            response = await self._session.request(
                method,
                info["url"] + path,
                json=body,
                headers={"Authorization": f"Bearer {info['key']}"},
                **({"timeout": timeout} if timeout is not None else {}),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if retry and nothing_sent(exc):
                await self.host_info(refresh=True)
                return await self._request(method, path, body, timeout=timeout, retry=False)
            raise await asyncio.to_thread(self.locator.lost, info, exc) from exc
        if response.status == 401 and retry:  # a new host with a new key took over the file
            response.release()
            await self.host_info(refresh=True)
            return await self._request(method, path, body, timeout=timeout, retry=False)
        if response.status >= 400:
            try:
                payload = await response.json(content_type=None)
            except (ValueError, aiohttp.ClientError):
                payload = await response.text()
            response.release()
            raise error_from_json(payload, response.status)
        return response, info

    async def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        import aiohttp

        response, info = await self._request(method, path, body)
        try:
            async with response:
                return await response.json()
        except (aiohttp.ClientError, OSError) as exc:
            raise await asyncio.to_thread(self.locator.lost, info, exc) from exc

    async def status(self) -> dict:
        return await self._json("GET", "/api/status")

    async def load(
        self, model: str | None = None, *, on_progress: Callable[[dict], None] | None = None, **fields: Any
    ) -> dict:
        """Load ``model`` or attach to it; read as a progress stream, so a long load is never a silent connection."""
        import aiohttp

        body = dict(_load_body(model, self.identity, **fields), stream=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=stream_read_timeout())
        response, info = await self._request("POST", "/api/models/load", body, timeout=timeout)
        try:
            async with response:
                async for line in response.content:
                    answer = _progress_event(line, on_progress)
                    if answer is not None:
                        return answer
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise await asyncio.to_thread(self.locator.lost, info, exc) from exc
        raise _no_answer("/api/models/load")

    async def unload(self, model: str | None = None, *, all: bool = False, force: bool = False) -> dict:
        return await self._json(
            "POST", "/api/models/unload", {"model": model, "all": all, "force": force, "client": self.identity}
        )

    async def chat(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> str:
        """The reply's text; read as a stream, so a host that dies or hangs is an error within seconds."""
        return await self.chat_stream(messages, model, **params).read()

    def chat_stream(self, messages: list[dict] | str, model: str | None = None, **params: Any) -> AsyncChatStream:
        """``async for`` text chunks; breaking out of the loop cancels the generation on the host."""
        return AsyncChatStream(self, _chat_body(model, messages, params))

    async def embed(self, inputs: str | list[str], model: str) -> list[list[float]]:
        data = (await self._json("POST", "/v1/embeddings", {"model": model, "input": inputs}))["data"]
        return [item["embedding"] for item in sorted(data, key=lambda d: d["index"])]


__all__ = [
    "AsyncChatStream",
    "AsyncClient",
    "ChatStream",
    "Client",
    "HostLocator",
    "LlmNbError",
    "client_identity",
    "nothing_sent",
    "spawn_host",
    "start_host",
]
