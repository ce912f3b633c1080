"""Host side of the model workers: start, talk to, supervise and end them.

One ``WorkerProcess`` per loaded model. The host holds the write end of the
worker's stdin pipe and never writes to it: when the host dies, for any
reason, the worker reads EOF and exits (``llm_nb.processes.die_with_parent``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp

from .. import processes
from ..catalog import ModelSpec
from ..cpu import amx_advice, has_amx
from ..errors import LlmNbError, ModelCrashed, ModelFailed, error_from_json
from ..processes import describe_exit

log = logging.getLogger("llm_nb.host.workers")
LOG_TAIL_LINES = 15
#: After a fault: room for faulthandler's stack of the faulting thread and what llama.cpp said before.
CRASH_TAIL_LINES = 24


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return processes.tail(path, lines)


#: Signals a process gets from a fault of its own (a bad memory access, an illegal instruction, an
#: abort from an assertion): unlike SIGKILL (the OOM killer, a person), loading the same model the
#: same way again is likely to end the same way.
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})


def fault_signal(returncode: int | None) -> signal.Signals | None:
    """The fault signal that ended a process, if one did."""
    if returncode is None or returncode >= 0:
        return None
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return None
    return sig if sig in FAULT_SIGNALS else None


def crash_advice(spec: ModelSpec, returncode: int | None) -> str:
    """What to do about a worker that ended this way, or "" for a plain reload."""
    if fault_signal(returncode) is None:
        return ""
    if spec.backend == "llamacpp" and has_amx() and _forced_on(spec.options.get("extra_buffers")):
        return amx_advice(spec.name)
    return f"loading {spec.name!r} the same way is likely to crash again: check its log, or load it with other options"


def _forced_on(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def crash_reason(what: str, spec: ModelSpec, returncode: int | None, log_path: Path) -> str:
    """``what`` ("the worker") of ``spec`` ended: how, and the end of its log."""
    reason = f"{what} of {spec.name!r} {describe_exit(returncode)}"
    if fault_signal(returncode):
        reason += f" (a fault in the {spec.backend} backend's native code, not a lack of memory)"
    last = tail(log_path, CRASH_TAIL_LINES if fault_signal(returncode) else LOG_TAIL_LINES)
    # faulthandler's list of loaded extension modules is one long line that says nothing here.
    last = "\n".join(line for line in last.splitlines() if not line.startswith("Extension modules:")).strip()
    return f"{reason}; last lines of its log ({log_path}):\n{last}" if last else reason


def crashed_error(what: str, spec: ModelSpec, returncode: int | None, log_path: Path) -> ModelCrashed:
    """The error a request of a model whose process died gets: the crash, and what to do."""
    advice = crash_advice(spec, returncode)
    fresh = f"\nload it again to start a fresh one (`%llm_load {spec.name}`)"
    return ModelCrashed(
        crash_reason(what, spec, returncode, log_path) + (f"\n{advice}" if advice else fresh),
        exit=describe_exit(returncode),
    )


def safe_name(name: str) -> str:
    """A model or deployment name as a file name (its log's)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


class WatchedProcess:
    """What every runner that is a process of the host's shares: its state, the watch on its exit, and
    how its crash is said (``what``: "the worker", "the vLLM server")."""

    what = "the worker"
    spec: ModelSpec
    log_path: Path
    on_exit: Callable[[WatchedProcess], Awaitable[None]] | None

    def _no_process_yet(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.exited = asyncio.Event()
        self._watch: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def crash_reason(self) -> str:
        return crash_reason(self.what, self.spec, self.returncode, self.log_path)

    def crashed_error(self) -> ModelCrashed:
        return crashed_error(self.what, self.spec, self.returncode, self.log_path)

    def _watch_exit(self) -> None:
        self._watch = asyncio.create_task(self._wait_exit())

    async def _wait_exit(self) -> None:
        assert self.process is not None
        await self.process.wait()
        self.exited.set()
        if not self.stopping:
            log.warning("%s", self.crash_reason())
            self._ended_by_itself()
        if self.on_exit is not None:
            await self.on_exit(self)

    def _ended_by_itself(self) -> None:
        """What to do when the process ended without being asked to (nothing, for a worker)."""


class WorkerProcess(WatchedProcess):
    """A worker process and the Unix-socket session that reaches it: a loaded model's runner."""

    def __init__(
        self,
        spec: ModelSpec,
        socket_path: Path,
        log_path: Path,
        on_exit: Callable[[WatchedProcess], Awaitable[None]] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.spec = spec
        self.env = env or {}  # beside the host's own environment (a Ray driver's cluster settings)
        self.socket_path = socket_path
        self.log_path = log_path
        self.on_exit = on_exit
        self.session: aiohttp.ClientSession | None = None
        self._no_process_yet()

    async def start(self, timeout: float = 60.0) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_file = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - handed to the child
        env = dict(os.environ, **self.env, LLM_NB_WORKER="1", PYTHONUNBUFFERED="1")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llm_nb.worker",
                "--socket",
                str(self.socket_path),
                "--parent-pid",
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                env=env,
            )
        finally:
            log_file.close()
        self._watch_exit()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set():
                raise ModelFailed(f"the worker for {self.spec.name!r} did not start: {self.crash_reason()}")
            if self.socket_path.exists() and await self._answers():
                return
            if time.monotonic() > deadline:
                await self.kill()
                raise ModelFailed(
                    f"the worker for {self.spec.name!r} did not answer within {timeout:.0f} s; see {self.log_path}"
                )
            await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        """Whether the worker answers yet. Its socket file exists from bind(), a moment before it
        listens: a refused connection then means "not yet", not a crash (seen on busy cores)."""
        assert self.session is not None
        try:
            async with self.session.get("http://worker/info", timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    # --- requests ------------------------------------------------------------
    async def _raise_for(self, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ClientError):
                body = {"error": {"message": (await response.text())[:500]}}
            raise error_from_json(body, response.status)

    async def _crashed(self, exc: BaseException) -> LlmNbError:
        """The connection broke: wait a moment for the exit, then say why."""
        if self.stopping:
            return LlmNbError(
                f"model {self.spec.name!r} was unloaded while the request ran", code="model_unloaded", status=503
            )
        try:
            await asyncio.wait_for(self.exited.wait(), 1.5)
        except TimeoutError:
            return ModelCrashed(f"lost the connection to the worker of {self.spec.name!r}: {exc}")
        return self.crashed_error()

    async def _json(self, method: str, path: str, payload: dict | None = None, timeout: float | None = 30.0) -> dict:
        assert self.session is not None
        try:
            async with self.session.request(
                method, f"http://worker{path}", json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await self._raise_for(response)
                return await response.json()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise await self._crashed(exc) from exc

    async def _stream(self, path: str, payload: dict) -> AsyncIterator[dict]:
        """POST and yield each NDJSON line; leaving early closes the connection (cancels)."""
        assert self.session is not None
        try:
            async with self.session.post(f"http://worker{path}", json=payload) as response:
                await self._raise_for(response)
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise await self._crashed(exc) from exc

    async def info(self) -> dict:
        return await self._json("GET", "/info", timeout=10)

    async def open(self, on_progress: Callable[[dict], None]) -> dict:
        """Start the process and load the model in it; returns the worker's info."""
        await self.start()
        return await self.load(on_progress)

    async def refresh_health(self) -> bool:
        """Nothing to poll: a worker that dies is reported at once by its exit watcher."""
        return False

    async def load(self, on_progress: Callable[[dict], None]) -> dict:
        """Load the model; returns the worker's info once it is ready."""
        async for event in self._stream("/load", self.spec.to_json()):
            if event.get("event") == "progress":
                on_progress(event)
            elif event.get("event") == "ready":
                return event["info"]
            elif event.get("event") == "error":
                raise error_from_json(event, 500)
        raise (
            self.crashed_error() if self.exited.is_set() else ModelFailed("the worker ended the load without an answer")
        )

    def generate(self, request: dict) -> AsyncIterator[dict]:
        return self._stream("/generate", request)

    async def embed(self, inputs: list[str | list[int]]) -> dict:
        return await self._json("POST", "/embed", {"input": inputs}, timeout=None)

    async def classify(self, inputs: list, parameters: dict) -> dict:
        return await self._json("POST", "/classify", {"input": inputs, "parameters": parameters}, timeout=None)

    async def tokenize(self, text: str) -> list[int]:
        return (await self._json("POST", "/tokenize", {"text": text}))["tokens"]

    # --- ending --------------------------------------------------------------
    async def stop(self, grace: float = 5.0, replaced: bool = False) -> None:
        """Ask the worker to end, then SIGKILL it after ``grace`` seconds (``replaced``: a newer version serves)."""
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            try:
                await self._json("POST", "/shutdown", {"replaced": replaced}, timeout=min(grace, 2.0))
            except LlmNbError:
                pass
            try:
                await asyncio.wait_for(self.exited.wait(), grace)
            except TimeoutError:
                log.warning("worker of %s did not end within %.1f s: killing it", self.spec.name, grace)
                await self.kill()
        await self.close()

    async def kill(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
            await self.exited.wait()
        await self.close()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        self.socket_path.unlink(missing_ok=True)
