"""Start, watch and stop the one model host that belongs to a Jupyter server.

The host is started by ``llm_nb.locator.spawn_host``, as the kernels start
one: under ``llm_nb.launcher`` (which records how it ends) in a session of its
own, so a Ctrl-C meant for the server's confirmation prompt does not reach it;
``--parent-pid`` makes it stop by itself if the server dies without cleaning
up. It is watched by pid, whether this server started it or adopted one that a
kernel started first. The supervisor restarts a host that crashes (a signal or a non-zero exit),
with backoff, and gives up after ``max_restarts`` crashes in a short window so
that a host that cannot live does not spin. A host that exits 0 was stopped on
purpose (``llm-nb stop``, SIGTERM): it is not restarted until it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil

from .. import processes
from ..config import stream_read_timeout
from ..connection import read_connection
from ..errors import HostUnavailable
from ..locator import spawn_host
from ..streams import sse_event

CRASH_WINDOW_S = 300.0
EXIT_POLL_S = 0.25
STOP_GRACE_S = 15.0  # the host is gone within 10 s of SIGTERM whatever is in flight (app.STOP_BOUND_S)
LOG_TAIL_LINES = 20


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ended (how is unknown: nothing recorded its exit)"
    return processes.describe_exit(code)


class HostSupervisor:
    """Owns the host process of one Jupyter server.

    ``state`` is one of ``stopped`` (not started yet, or stopped on purpose),
    ``starting``, ``running``, ``restarting`` (after a crash), ``failed``
    (it could not start, or crashed too often) and ``stopping``.
    """

    def __init__(
        self,
        connection_file: Path,
        *,
        host_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        max_restarts: int = 5,
        on_change: Callable[[], None] | None = None,
        log: logging.Logger | None = None,
    ):
        self.connection_file = connection_file
        self.log_path = connection_file.with_suffix(".log")
        self.host_args = list(host_args or [])
        self.env = env
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.on_change = on_change or (lambda: None)
        self.log = log or logging.getLogger("llm_nb.serverext")

        self.state = "stopped"
        self.pid: int | None = None
        self.started_at: float | None = None
        self.adopted = False
        self.restarts = 0
        self.last_exit: dict | None = None
        self.error: str | None = None
        self.status: dict | None = None  # the host's own /api/status, kept current by its event stream

        self._info: dict | None = None
        self._host: psutil.Process | None = None  # watched by pid, whether we started it or adopted it
        self._generation = 0
        self._crashes: list[float] = []
        self._lock = asyncio.Lock()
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._events_task: asyncio.Task | None = None

    # --- what the panel sees ---------------------------------------------------
    def describe(self) -> dict:
        """The host's state for the browser: never the key or the URL."""
        return {
            "state": self.state,
            "pid": self.pid,
            "started_at": self.started_at,
            "adopted": self.adopted,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "error": self.error,
            "log_file": str(self.log_path),
        }

    @property
    def info(self) -> dict | None:
        """Connection info (url and key) while the host runs; for server-side use only."""
        return self._info if self.state == "running" else None

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        if state != "running":
            self.status = None
        self.on_change()

    # --- starting --------------------------------------------------------------
    async def ensure_started(self) -> dict:
        """Connection info of a running host, starting one if there is none."""
        if self.state == "running" and self._info is not None:
            return self._info
        async with self._lock:
            if self.state == "running" and self._info is not None:
                return self._info
            if self._stopping:
                raise HostUnavailable("the Jupyter server is shutting down; the model host is stopping with it")
            await self._start()
            assert self._info is not None
            return self._info

    async def restart(self) -> dict:
        """Stop the host (if any) and start a fresh one; models it had loaded are gone."""
        async with self._lock:
            await self._terminate()
            self._crashes.clear()
            await self._start()
            assert self._info is not None
            return self._info

    async def _start(self) -> None:
        self._set_state("starting")
        try:
            # The same spawn_host as the kernels', under the same file lock: a kernel that finds no host
            # while we start one waits for ours, and a host a kernel started first is adopted.
            info, started = await asyncio.to_thread(
                spawn_host,
                self.connection_file,
                host_args=["--parent-pid", str(os.getpid()), *self.host_args],
                env=self.env,
                timeout=self.start_timeout,
            )
        except HostUnavailable as exc:
            self._set_state("failed", f"{exc}\nfix the cause, then start it again from the LLM panel")
            raise
        self._generation += 1
        self._info = info
        self.pid = int(info["pid"])
        self.adopted = not started
        self._host = _process_or_none(self.pid)
        self.started_at = time.time()
        self._set_state("running")
        self.log.info(
            "llm-nb: model host %s (pid %s, connection file %s)",
            "adopted" if self.adopted else "started",
            self.pid,
            self.connection_file,
        )
        self._spawn_task(self._watch(self._generation))
        self._events_task = self._spawn_task(self._follow_events(self._generation, info))

    # --- watching --------------------------------------------------------------
    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_exit(self, pid: int) -> int | None:
        """Wait for the host to end; its exit status, from the record its launcher writes (None if none)."""
        while _running(self._host):
            await asyncio.sleep(EXIT_POLL_S)
        record = await asyncio.to_thread(processes.read_exit, self.connection_file, pid, 2.0)
        return record.get("returncode") if record else None

    async def _watch(self, generation: int) -> None:
        pid = self.pid
        code = await self._wait_exit(pid)
        if self._stopping or generation != self._generation:
            return  # we stopped it ourselves
        self._info = None
        self._host = None
        self.pid = None
        if code == 0:
            self.log.info("llm-nb: the model host stopped on request; it starts again when needed")
            self._set_state("stopped")
            return
        now = time.time()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_S] + [now]
        self.last_exit = {
            "code": code,
            "pid": pid,
            "reason": describe_exit(code),
            "at": now,
            "log_tail": processes.tail(self.log_path, LOG_TAIL_LINES),
        }
        self.log.warning("llm-nb: the model host (pid %s) %s", pid, self.last_exit["reason"])
        if len(self._crashes) > self.max_restarts:
            self._set_state(
                "failed",
                f"the model host crashed {len(self._crashes)} times in {CRASH_WINDOW_S / 60:.0f} minutes; "
                f"not restarting it. See {self.log_path}, then restart it from the LLM panel.",
            )
            return
        self._set_state("restarting")
        await asyncio.sleep(min(30.0, 0.5 * 2 ** (len(self._crashes) - 1)))
        async with self._lock:
            if self._stopping or self.state != "restarting":
                return
            self.restarts += 1
            with contextlib.suppress(HostUnavailable):  # _start records the failure in state
                await self._start()

    async def _follow_events(self, generation: int, info: dict) -> None:
        """Keep ``status`` current from the host's own event stream (one connection, however many tabs)."""
        if self._session is None or self._session.closed:
            # The host writes to this stream at least every heartbeat: silence means it is hung or gone.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=stream_read_timeout())
            )
        headers = {"Authorization": f"Bearer {info['key']}", "Accept": "text/event-stream"}
        while generation == self._generation and self.state == "running" and not self._stopping:
            try:
                async with self._session.get(info["url"] + "/api/events", headers=headers) as response:
                    response.raise_for_status()
                    async for raw in response.content:
                        status = sse_event(raw)  # None for the keep-alive comments between snapshots
                        if isinstance(status, dict) and generation == self._generation and self.state == "running":
                            self.status = status
                            self.on_change()
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.log.debug("llm-nb: host event stream ended: %s", exc)
            await asyncio.sleep(1.0)

    # --- stopping --------------------------------------------------------------
    async def _terminate(self) -> None:
        """Stop the current host (ours or adopted) and wait for it."""
        self._generation += 1  # its watcher must not take this exit for a crash
        host, pid = self._host, self.pid
        self._host = None
        self._info = None
        if pid is None:
            return
        self._set_state("stopping")
        # Close our event stream first: the host waits for open requests before it stops.
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        if not await _terminate_pid(host):
            self.log.warning("llm-nb: the model host did not stop within %.0f s; it was killed", STOP_GRACE_S)
        self.pid = None
        self._set_state("stopped")

    async def stop_host(self) -> None:
        """Stop the host now (the panel's Stop); the next need starts it again."""
        async with self._lock:
            await self._terminate()

    async def stop(self) -> None:
        """The server is stopping: end the host and every task of ours."""
        self._stopping = True
        await self._terminate()
        # A host that a kernel started at our file after we stopped watching is ours too.
        stray = read_connection(self.connection_file)
        stray_process = _process_or_none(int(stray["pid"])) if stray and stray.get("pid") else None
        if stray_process is not None and _is_host(stray_process):
            await _terminate_pid(stray_process)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def _process_or_none(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _is_host(process: psutil.Process) -> bool:
    """Guard against a reused pid: only ever signal a process that is an llm-nb host."""
    try:
        return "llm_nb.host" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _running(process: psutil.Process | None) -> bool:
    """Alive and not a zombie; ``is_running`` also compares start times, so a reused pid is not ours."""
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _terminate_pid(process: psutil.Process | None) -> bool:
    """SIGTERM a host, then SIGKILL it if it is still there after the grace time; False if it had to be killed."""
    if not _running(process):
        return True
    with contextlib.suppress(psutil.Error):
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    while _running(process) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if _running(process):
        with contextlib.suppress(psutil.Error):
            process.kill()
        return False
    return True
