"""One loaded model as the registry keeps it: its runner, leases, state, costs and status.

A model is served by a *runner*: a worker process (``workers.WorkerProcess``)
for a local model, or a remote engine (``remote.RemoteEngine``). Both offer the
same small interface, ``Runner``, so the routes never ask which one they hold.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..catalog import ModelSpec
from .scheduler import ModelQueue


class Runner(Protocol):
    """What serves a loaded model's requests."""

    @property
    def pid(self) -> int | None:
        """The process that holds the model here, to measure (None: nothing runs here)."""

    @property
    def log_path(self) -> Path | None: ...

    async def open(self, on_progress: Callable[[dict], None]) -> dict:
        """Bring the model up; returns its ``info()``."""

    def generate(self, request: dict) -> AsyncIterator[dict]:
        """``{"text"}`` events, then ``{"finish_reason", "prompt_tokens", "completion_tokens"}``."""

    async def embed(self, inputs: list[str | list[int]]) -> dict:
        """``{"data": [vector, ...], "prompt_tokens": n}``."""

    async def classify(self, inputs: list, parameters: dict) -> dict: ...

    async def info(self) -> dict: ...

    async def refresh_health(self) -> bool:
        """Check on the model now and then; True when ``info()`` changed."""

    async def stop(self, grace: float) -> None: ...

    async def kill(self) -> None: ...


@dataclass
class Lease:
    """One client's hold on a model. ``pid`` lets the host notice the client is gone.

    In hub mode ``user`` is the Hub user the host identified (never the client's word; ``client``
    is then prefixed with it, so one user cannot release another's lease), ``server`` the
    user's named server ("" the default one) and ``hostname`` where ``pid`` runs: a pid on
    another machine (a user's server in its own container) is never looked up here.
    """

    client: str
    name: str = ""
    pid: int | None = None
    pid_started: float | None = None
    since: float = field(default_factory=time.time)
    user: str | None = None
    server: str | None = None
    hostname: str | None = None

    @classmethod
    def from_json(cls, data: dict | None, fallback: str, user: str | None = None) -> Lease:
        data = data if isinstance(data, dict) else {}
        client = str(data.get("id") or data.get("client") or fallback)[:200]
        pid = data.get("pid")
        started = data.get("pid_started")
        server, hostname = data.get("server"), data.get("hostname")
        return cls(
            client=f"{user}/{client}" if user is not None else client,
            name=str(data.get("name") or client)[:300],
            pid=int(pid) if isinstance(pid, int) and pid > 0 else None,
            pid_started=float(started) if isinstance(started, (int, float)) else None,
            user=user,
            server=str(server)[:255] if user is not None and isinstance(server, str) else None,
            hostname=str(hostname)[:255] if isinstance(hostname, str) else None,
        )

    def watchable(self) -> bool:
        """Whether its pid can be checked from here (it runs on this machine)."""
        return self.pid is not None and (self.hostname is None or self.hostname == socket.gethostname())

    def to_json(self) -> dict:
        return asdict(self)


class LoadedModel:
    def __init__(self, spec: ModelSpec, keep_alive: float, estimate_bytes: int, max_waiting: int):
        self.spec = spec
        self.state = "loading"  # loading, ready, unloading, failed ("idle" is ready with no lease)
        self.runner: Runner | None = None
        self.leases: dict[str, Lease] = {}
        self.queue = ModelQueue(spec.name, 1, max_waiting)
        self.keep_alive = keep_alive
        self.estimate_bytes = estimate_bytes
        self.measured = {"rss_bytes": 0, "gpu_bytes": 0}
        self.info: dict = {}
        self.cache_shown: dict | None = None  # the conversation cache's figures as the last status event had them
        self.progress: dict = {}
        self.failure: str | None = None
        self.requests_served = 0
        self.created = time.time()
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None
        self.last_used = time.time()
        self.idle_since: float | None = None
        self.load_task: asyncio.Task | None = None

    @property
    def display_state(self) -> str:
        if self.state == "ready" and self.info.get("healthy") is False:  # a remote that stopped answering
            return "unreachable"
        return "idle" if self.state == "ready" and not self.leases else self.state

    def cost_bytes(self, kind: str) -> int:
        """What counts against the budget: measured, or the estimate while loading."""
        if self.state == "failed" or self.spec.backend == "remote":
            return 0
        measured = self.measured["gpu_bytes"] if kind == "gpu" else self.measured["rss_bytes"]
        if self.state == "loading":
            return max(measured, self.estimate_bytes)
        return measured + self.cache_room(kind)

    def cache_room(self, kind: str) -> int:
        """What the conversation cache may still grow by, where it lives (``kind``: the budget's, gpu
        or ram): the budget keeps that much free, so a cache filling up never takes it past its size."""
        cache = self.info.get("prompt_cache") or {}
        on_gpu = str(cache.get("device") or "cpu").startswith("cuda")
        if not cache or on_gpu != (kind == "gpu"):
            return 0
        return max(0, int(cache.get("cap_bytes") or 0) - int(cache.get("bytes") or 0))

    def expires_at(self) -> float | None:
        if self.leases or self.idle_since is None or self.keep_alive < 0:
            return None
        # From the last use, not only from the last lease's end: a model that requests keep
        # busy (loaded on first use, held by nobody) stays while it is used.
        return max(self.idle_since, self.last_used) + self.keep_alive

    def touch(self) -> None:
        self.last_used = time.time()

    def status_json(self, kind: str) -> dict:
        log_path = self.runner.log_path if self.runner else None
        return {
            "name": self.spec.name,
            "backend": self.spec.backend,
            "device": self.info.get("device", "remote" if self.spec.backend == "remote" else None),
            "state": self.display_state,
            "memory_bytes": self.cost_bytes(kind),
            "rss_bytes": self.measured["rss_bytes"],
            "gpu_bytes": self.measured["gpu_bytes"],
            "estimate_bytes": self.estimate_bytes,
            "leases": [
                {"client": lease.client, "name": lease.name, "since": lease.since, "user": lease.user}
                for lease in self.leases.values()
            ],
            "in_flight": self.queue.in_flight,
            "waiting": self.queue.waiting,
            "requests_served": self.requests_served,
            "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds,
            "last_used": self.last_used,
            "keep_alive": self.keep_alive,
            "expires_at": self.expires_at(),
            "path": self.spec.path,
            "url": self.spec.url,
            "task": self.spec.task,
            "worker_pid": self.runner.pid if self.runner else None,
            "log_file": str(log_path) if log_path else None,
            "progress": self.progress if self.state == "loading" else None,
            "failure": self.failure,
            "info": {k: v for k, v in self.info.items() if k not in ("state", "progress", "error", "rss_bytes", "pid")},
        }
