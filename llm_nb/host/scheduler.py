"""One bounded queue per model.

A model runs ``slots`` requests at once (llama.cpp: 1, in turn; a batching
backend: its batch size) and lets at most ``max_waiting`` more wait. Past
that a request is refused at once with 429 and a ``Retry-After`` estimated
from recent request times, rather than hanging (vllm#18826). Waiters are
served first come, first served; a running stream is never cut off by a new
request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..errors import QueueFull


class ModelQueue:
    def __init__(self, name: str, slots: int = 1, max_waiting: int = 64):
        self.name = name
        self.slots = max(1, slots)
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(self.slots)
        self._durations: deque[float] = deque(maxlen=32)

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    def retry_after(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        return max(1, math.ceil(typical * (self.waiting + 1) / self.slots))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the model's slots for the duration of a request."""
        if self.running >= self.slots and self.waiting >= self.max_waiting:
            after = self.retry_after()
            raise QueueFull(
                f"model {self.name!r} has {self.waiting} requests waiting, its limit; retry in about {after} s",
                retry_after=after,
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self._durations.append(time.monotonic() - started)
            self._semaphore.release()
