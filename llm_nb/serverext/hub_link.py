"""A user's server of a JupyterHub whose ``llm-nb hub-service`` runs the one shared host.

The server starts no host of its own: it speaks to the Hub's host with the user's
own Hub API token, follows its event stream as the supervisor follows a host of
its own, and reports what it sees (running, or not answering while the Hub
restarts it). Stopping or restarting the shared host is not a user's business
here: those buttons answer 409 and say whom to ask.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from ..errors import HostUnavailable, LlmNbError
from .supervisor import HostSupervisor

HEALTH_POLL_S = 2.0


class HubServiceLink(HostSupervisor):
    """The supervisor's face (state, info, status, describe) over the Hub's shared host."""

    def __init__(self, url: str, token: str, runtime: Path, **kwargs):
        # No connection file of ours: the shared host's log belongs to the Hub's operator.
        super().__init__(runtime / "llm-nb-hub-service.json", **kwargs)
        self.url = url.rstrip("/")
        self.token = token
        # Its own pool: the event stream's (``_session``) has the read timeout that finds a silent host.
        self._health_session: aiohttp.ClientSession | None = None

    def describe(self) -> dict:
        return {**super().describe(), "shared": "jupyterhub", "adopted": True, "log_file": None}

    async def _health(self) -> dict:
        if self._health_session is None or self._health_session.closed:
            self._health_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        async with self._health_session.get(self.url + "/health") as response:
            response.raise_for_status()
            return await response.json()

    async def _start(self) -> None:
        self._set_state("starting")
        try:
            health = await self._health()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            self._set_state(
                "failed",
                f"the JupyterHub's llm-nb service at {self.url} does not answer ({exc or type(exc).__name__}). It is "
                "shared by every user of this Hub: ask the Hub's admin (its log says why).",
            )
            raise HostUnavailable(self.error or "the Hub's llm-nb service does not answer") from None
        self._adopt(health)

    def _adopt(self, health: dict) -> None:
        self._generation += 1
        self._info = {"url": self.url, "key": self.token, "pid": health.get("pid")}
        self.pid = health.get("pid")
        self.adopted = True
        self.started_at = health.get("started") or time.time()
        self._set_state("running")
        self.log.info("llm-nb: using the JupyterHub's shared model host at %s (pid %s)", self.url, self.pid)
        self._spawn_task(self._watch(self._generation))
        self._events_task = self._spawn_task(self._follow_events(self._generation, self._info))

    async def _watch(self, generation: int) -> None:
        """Poll the shared host: say when it does not answer, and take up the new one after a restart."""
        while generation == self._generation and not self._stopping:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                health = await self._health()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                if self.state == "running":
                    self.last_exit = {"pid": self.pid, "reason": f"stopped answering ({exc})", "at": time.time()}
                    self._set_state("restarting", "the Hub's shared llm-nb host does not answer; waiting for it")
                continue
            if health.get("pid") != self.pid or self.state != "running":
                if self.pid is not None and health.get("pid") != self.pid:
                    self.restarts += 1
                    self.last_exit = {"pid": self.pid, "reason": "was restarted by the Hub", "at": time.time()}
                self._adopt(health)
                return

    async def restart(self) -> dict:
        raise LlmNbError(
            "the model host is shared by every user of this JupyterHub: only the Hub's admin restarts it",
            code="shared_host",
            status=409,
        )

    async def stop_host(self) -> None:
        await self.restart()

    async def stop(self) -> None:
        """The user's server is stopping: stop following the shared host (which goes on)."""
        self._stopping = True
        self._generation += 1
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in (self._session, self._health_session):
            if session is not None:
                await session.close()
