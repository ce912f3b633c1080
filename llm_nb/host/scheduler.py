"""One bounded queue per model, fair between users.

A model runs ``slots`` requests at once (llama.cpp: 1, in turn; a batching
backend: its batch size) and lets at most ``max_waiting`` more wait. Past
that a request is refused at once with 429 and a ``Retry-After`` estimated
from recent request times, rather than hanging (vllm#18826). A running stream
is never cut off by a new request.

Waiters are served round-robin between users, then first come, first served:
a free slot goes to the waiting user served least recently, so one user's 32
parallel requests do not push another user's single chat behind them. The
user is the Hub user the host identified (``CALLER``, set per request in hub
mode); without a Hub every request is the same user, and the order is plain
first come, first served.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from ..errors import QueueFull

#: Who the current request is for (a Hub user's name; None without a Hub).
CALLER: ContextVar[str | None] = ContextVar("llm_nb_caller", default=None)


class ModelQueue:
    def __init__(self, name: str, slots: int = 1, max_waiting: int = 64):
        self.name = name
        self.slots = max(1, slots)
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._durations: deque[float] = deque(maxlen=32)
        self._waiters: dict[str | None, deque[tuple[int, asyncio.Future]]] = {}
        self._arrivals = itertools.count()
        self._served = itertools.count()
        #: When each user last got a slot: the one served least recently goes first.
        self._last_served: dict[str | None, int] = {}

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting

    def retry_after(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        return max(1, math.ceil(typical * (self.waiting + 1) / self.slots))

    def _next_user(self) -> str | None:
        # Least recently served first (never served: first of all); ties by who has waited longest.
        return min(self._waiters, key=lambda u: (self._last_served.get(u, -1), self._waiters[u][0][0]))

    def _grant(self, user: str | None) -> None:
        self.running += 1
        self._last_served[user] = next(self._served)

    def _wake(self) -> None:
        while self.running < self.slots and self._waiters:
            user = self._next_user()
            queue = self._waiters[user]
            _, future = queue.popleft()
            if not queue:
                del self._waiters[user]
            if future.done():  # its request was cancelled while it waited
                continue
            self._grant(user)
            future.set_result(None)

    async def _acquire(self, user: str | None) -> None:
        if self.running < self.slots and not self._waiters:
            self._grant(user)
            return
        future = asyncio.get_running_loop().create_future()
        entry = (next(self._arrivals), future)
        self._waiters.setdefault(user, deque()).append(entry)
        self.waiting += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as it was cancelled: give it back
                self._release()
            else:
                queue = self._waiters.get(user)
                if queue is not None and entry in queue:
                    queue.remove(entry)
                    if not queue:
                        del self._waiters[user]
            raise
        finally:
            self.waiting -= 1

    def _release(self) -> None:
        self.running -= 1
        self._wake()

    @asynccontextmanager
    async def slot(self, user: str | None = None) -> AsyncIterator[None]:
        """Hold one of the model's slots for the duration of a request (``user``: default ``CALLER``)."""
        if self.running >= self.slots and self.waiting >= self.max_waiting:
            after = self.retry_after()
            raise QueueFull(
                f"model {self.name!r} has {self.waiting} requests waiting, its limit; retry in about {after} s",
                retry_after=after,
            )
        await self._acquire(CALLER.get() if user is None else user)
        started = time.monotonic()
        try:
            yield
        finally:
            self._durations.append(time.monotonic() - started)
            self._release()
