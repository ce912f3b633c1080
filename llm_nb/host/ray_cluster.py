"""The Ray cluster that ``engine="ray"`` deployments run on.

``RAY_ADDRESS`` (or ``LLM_NB_RAY_ADDRESS``, or ``c.LlmNbExtension.ray_address``)
names a cluster that runs already; the host only connects to it. Without one,
the first Ray deploy starts a local head (``llm_nb.ray_head``) with a bounded
share of this machine: ``LLM_NB_RAY_NUM_CPUS`` logical CPUs (default: the
machine's cores) and ``LLM_NB_RAY_OBJECT_STORE`` of shared memory (default
256 MiB; deployments pass small JSON). The host owns that head: it ends with
the host, however the host ends.

The local head takes token authentication with a token of its own (a 0600
file in the host's folder), handed to its drivers alone: Ray switches a head
to token mode by itself when ``~/.ray/auth_token`` exists (any plain
``ray.init()`` writes one), and a driver that was not told then cannot
connect. Drivers never start a Ray of their own (``RAY_ENABLE_AUTO_CONNECT=0``):
a Serve call that races the driver's shutdown would otherwise launch a whole
local cluster from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..config import Settings
from ..errors import BackendUnavailable, LlmNbError

log = logging.getLogger("llm_nb.host.ray")
START_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 8.0


def ray_installed() -> bool:
    """Whether Ray Serve can be imported, found without importing Ray (a second of start-up the host never pays)."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    return spec is not None and any((Path(p) / "serve").is_dir() for p in spec.submodule_search_locations or [])


def require_ray() -> None:
    if not ray_installed():
        raise BackendUnavailable(
            "engine='ray' needs Ray Serve where the host runs; install it with `pip install 'llm-nb[ray]'`"
        )


class RayCluster:
    def __init__(self, settings: Settings, log_dir: Path, on_lost: Callable[[str], Awaitable[None]]):
        self.settings = settings
        self.log_path = log_dir / "ray-head.log"
        self.on_lost = on_lost
        self.process: asyncio.subprocess.Process | None = None
        self.temp_dir: Path | None = None
        self._address: str | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._watch: asyncio.Task | None = None
        self._starts = 0
        self.token_path = log_dir / "ray-auth-token"

    @property
    def owned(self) -> bool:
        return self.process is not None

    def driver_env(self) -> dict[str, str]:
        """What a deployment's Ray driver needs in its environment to reach this cluster, and only it."""
        env = {"RAY_ENABLE_AUTO_CONNECT": "0"}
        if self.owned:
            env.update(_token_env(self.token_path))
        return env

    async def address(self, progress: Callable[[dict], None] = lambda event: None) -> str:
        """The cluster's address; the first call without a configured one starts the local head."""
        require_ray()
        if self.settings.ray_address:
            return self.settings.ray_address
        async with self._lock:
            if self._address is None or (self.process is not None and self.process.returncode is not None):
                if self._stopping:
                    raise LlmNbError("the host is stopping: no Ray head starts now", code="host_stopping", status=503)
                progress({"stage": "ray", "message": "starting a local Ray head (first Ray deploy of this host)"})
                self._address = await self._start_local()
            return self._address

    async def _start_local(self) -> str:
        started = time.monotonic()
        # Short, and one per head this host starts: Ray's socket paths live below it and must stay
        # under 108 bytes, and a new head must not be taken for what is left of the one before.
        self._starts += 1
        self.temp_dir = Path(f"/tmp/llmnb-ray-{os.getuid()}-{os.getpid()}-{self._starts}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        num_cpus = self.settings.ray_num_cpus or os.cpu_count() or 1
        _write_token(self.token_path)
        with open(self.log_path, "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llm_nb.ray_head",
                f"--parent-pid={os.getpid()}",
                f"--num-cpus={num_cpus}",
                f"--object-store-memory={self.settings.ray_object_store}",
                f"--temp-dir={self.temp_dir}",
                stdin=asyncio.subprocess.PIPE,  # held by the host only: EOF means the host is gone
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, **_token_env(self.token_path)},
            )
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT_S)
            answer = json.loads(line or b"{}")
        except (TimeoutError, ValueError):
            answer = {}
        if "address" not in answer:
            await self._end_process()
            reason = answer.get("error") or "it exited before it said where it listens"
            raise LlmNbError(
                f"the local Ray head did not start: {reason}; its log is {self.log_path}",
                code="ray_unavailable",
                status=503,
            )
        log.info(
            "local Ray head at %s (pid %d, %d CPUs) started in %.1f s",
            answer["address"],
            self.process.pid,
            num_cpus,
            time.monotonic() - started,
        )
        self._watch = asyncio.ensure_future(self._watch_head(self.process, self.temp_dir))
        return answer["address"]

    async def _watch_head(self, process: asyncio.subprocess.Process, temp_dir: Path) -> None:
        code = await process.wait()
        if self._stopping or process is not self.process:
            return
        self._address = None
        reason = f"the local Ray head ended (exit code {code}); see {self.log_path}"
        log.warning("%s", reason)
        await self.on_lost(reason)
        await asyncio.to_thread(_sweep, temp_dir)

    async def stop(self) -> None:
        """End the local head, if this host started one (a cluster it only connected to runs on)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await self._end_process()

    async def _end_process(self) -> None:
        """Ask the keeper to end its head; a keeper that does not is killed, and its head swept up after it."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(OSError):  # closing its pipe asks it to end its tree
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the local Ray head did not end within %.0f s: killing it and its processes", STOP_TIMEOUT_S)
            process.kill()
            await process.wait()
        await asyncio.to_thread(_sweep, self.temp_dir)


def _token_env(path: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def _write_token(path: Path) -> None:
    """A fresh token for each head this host starts, readable by this user only."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as token:
        token.write(secrets.token_hex(32))


def _sweep(temp_dir: Path) -> None:
    """End what is left of a head whose keeper was killed (its processes went to init, out of reach).

    Every process of the head inherited the keeper's marker in its environment, but some (the
    raylet's agents) write their titles over that block: they are found as the raylet's children.
    """
    import shutil

    import psutil

    from ..ray_head import HEAD_MARKER_ENV

    marker = f"{HEAD_MARKER_ENV}={temp_dir}\0".encode()
    ended = 0
    for _ in range(3):  # a raylet still alive restarts the agents killed beside it: look again
        marked = [proc for proc in psutil.process_iter() if marker in _environ_bytes(proc.pid)]
        if not marked:
            break
        left = {proc.pid: proc for proc in marked}
        for proc in marked:
            with contextlib.suppress(psutil.Error):
                left.update((child.pid, child) for child in proc.children(recursive=True))
        left = sorted(left.values(), key=lambda proc: not _is_raylet(proc))  # it restarts what dies before it
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=3.0)
        ended += len(left)
    if ended:
        log.warning("ended %d processes of the local Ray head that outlived its keeper", ended)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _is_raylet(proc) -> bool:
    try:
        return proc.name() == "raylet"
    except Exception:  # psutil.Error: gone already
        return False


def _environ_bytes(pid: int) -> bytes:
    """A process's environment as the kernel keeps it. Not ``psutil.environ()``: Ray's processes
    rewrite their titles over the start of that block, and psutil stops reading at the damage."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as block:
            return block.read()
    except OSError:
        return b""
