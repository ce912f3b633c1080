"""Fan-out of status changes to the browser's event streams.

One upstream subscription to the host (kept by the supervisor) feeds any
number of open panels; each panel waits here for the next version instead of
polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class StatusHub:
    """The latest snapshot, a version number, and a way to wait for the next one."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build
        self.version = 0
        self.snapshot: dict = {}
        self.closed = False
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        # Made on first use, inside the server's running loop.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def publish(self) -> None:
        """Rebuild the snapshot and wake every waiter (callable from any coroutine or callback)."""
        self.snapshot = dict(self._build(), version=self.version + 1)
        self.version += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # nobody can be waiting without a loop
        loop.create_task(self._wake())

    async def _wake(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    async def wait(self, since: int, timeout: float) -> int:
        """Return the version once it differs from ``since``, or after ``timeout`` seconds."""
        condition = self._condition()
        async with condition:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(condition.wait_for(lambda: self.version != since or self.closed), timeout)
        return self.version

    async def close(self) -> None:
        """End every open stream (the server is stopping)."""
        self.closed = True
        await self._wake()
