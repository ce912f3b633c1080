"""Start, watch and stop the one model host that belongs to a Jupyter server.

The host is a child process (``python -m llm_nb.host``) in a session of its
own, so a Ctrl-C meant for the server's confirmation prompt does not reach it;
``--parent-pid`` makes it stop by itself if the server dies without cleaning
up. The supervisor restarts a host that crashes (a signal or a non-zero exit),
with backoff, and gives up after ``max_restarts`` crashes in a short window so
that a host that cannot live does not spin. A host that exits 0 was stopped on
purpose (``llm-nb stop``, SIGTERM): it is not restarted until it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
from filelock import FileLock
from filelock import Timeout as LockTimeout

from .. import processes
from ..config import stream_read_timeout
from ..connection import live_host, read_connection
from ..errors import HostUnavailable

CRASH_WINDOW_S = 300.0
STOP_GRACE_S = 20.0  # the host itself waits up to 10 s for requests in flight, then stops its workers
LOG_TAIL_LINES = 20


def describe_exit(code: int | None) -> str:
    if code is None:
        return "ended (exit status unknown: it was not started by this server)"
    return processes.describe_exit(code)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return processes.tail(path, lines)


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
        self._process: asyncio.subprocess.Process | None = None
        self._adopted: psutil.Process | None = None  # a host we did not start: watched by pid
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
            info, process = await self._spawn_or_adopt()
        except HostUnavailable as exc:
            self._set_state("failed", str(exc))
            raise
        self._generation += 1
        self._process = process
        self._info = info
        self.pid = int(info["pid"])
        self.adopted = process is None
        self._adopted = _process_or_none(self.pid) if self.adopted else None
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

    async def _acquire_file_lock(self) -> FileLock:
        # The same lock that llm_nb.client.start_host takes: a kernel that finds no host
        # while we start one waits for ours instead of starting a second.
        lock = FileLock(str(self.connection_file) + ".lock")
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                lock.acquire(timeout=0)
                return lock
            except LockTimeout:
                if time.monotonic() > deadline:
                    raise HostUnavailable(
                        f"{self.connection_file}.lock is held by another process for more than "
                        f"{self.start_timeout:.0f} s; is a host starting there?"
                    ) from None
                await asyncio.sleep(0.1)

    async def _spawn_or_adopt(self) -> tuple[dict, asyncio.subprocess.Process | None]:
        self.connection_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = await self._acquire_file_lock()
        try:
            existing = await asyncio.to_thread(live_host, self.connection_file)
            if existing is not None:
                # A host already serves this server's file (a kernel started one while ours was
                # down): use it rather than fail, and watch it like our own.
                return existing, None
            return await self._spawn()
        finally:
            lock.release()

    async def _spawn(self) -> tuple[dict, asyncio.subprocess.Process]:
        argv = [
            sys.executable,
            "-m",
            "llm_nb.host",
            "--connection-file",
            str(self.connection_file),
            "--parent-pid",
            str(os.getpid()),
            *self.host_args,
        ]
        with open(self.log_path, "ab", buffering=0) as log_file:
            log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C at the server's prompt must not stop the host
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            info = read_connection(self.connection_file)
            if info and info.get("pid") == process.pid:
                if await asyncio.to_thread(live_host, self.connection_file) is not None:
                    return info, process
            if process.returncode is not None:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 0.1)
        if process.returncode is None:
            process.kill()
            await process.wait()
            why = f"did not answer within {self.start_timeout:.0f} s"
        else:
            why = describe_exit(process.returncode)
        raise HostUnavailable(
            f"the llm-nb model host {why} while starting; last lines of {self.log_path}:\n"
            f"{tail(self.log_path)}\nfix the cause, then start it again from the LLM panel"
        )

    # --- watching --------------------------------------------------------------
    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_exit(self) -> int | None:
        if self._process is not None:
            return await self._process.wait()
        while _running(self._adopted):
            await asyncio.sleep(1.0)
        return None

    async def _watch(self, generation: int) -> None:
        pid = self.pid
        code = await self._wait_exit()
        if code is not None and pid is not None:
            # For the kernels: their next call says how this host ended (and whether the OOM killer did it).
            await asyncio.to_thread(processes.record_exit, self.connection_file, pid, code)
        if self._stopping or generation != self._generation:
            return  # we stopped it ourselves
        self._info = None
        self._process = None
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
            "log_tail": tail(self.log_path),
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
                    data: list[str] = []
                    async for raw in response.content:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        if line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif not line and data:
                            status = json.loads("\n".join(data))
                            data = []
                            if generation == self._generation and self.state == "running":
                                self.status = status
                                self.on_change()
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.log.debug("llm-nb: host event stream ended: %s", exc)
            await asyncio.sleep(1.0)

    # --- stopping --------------------------------------------------------------
    async def _terminate(self) -> None:
        """Stop the current host (ours or adopted) and wait for it."""
        self._generation += 1  # its watcher must not take this exit for a crash
        process, pid, adopted = self._process, self.pid, self._adopted
        self._process = None
        self._adopted = None
        self._info = None
        if pid is None:
            return
        self._set_state("stopping")
        # Close our event stream first: the host waits for open requests before it stops.
        if self._events_task is not None:
            self._events_task.cancel()
            await asyncio.gather(self._events_task, return_exceptions=True)
        if process is not None:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_GRACE_S)
                except TimeoutError:
                    self.log.warning("llm-nb: the model host did not stop within %.0f s; killing it", STOP_GRACE_S)
                    process.kill()
                    await process.wait()
        elif _running(adopted):
            await _terminate_pid(adopted)
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


async def _terminate_pid(process: psutil.Process | None) -> None:
    """SIGTERM a host we did not start, then SIGKILL it if it is still there after the grace time."""
    if not _running(process):
        return
    with contextlib.suppress(psutil.Error):
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    while _running(process) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if _running(process):
        with contextlib.suppress(psutil.Error):
            process.kill()
