"""Bounded concurrency for runs: a fixed number run at once, a few more wait in line, and the rest
are refused at once with a retry-after estimate instead of queueing without limit."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.executor.sandbox.interface import SandboxBusy


class Admission:
    def __init__(self, max_concurrent: int, max_waiting: int) -> None:
        if max_concurrent < 1 or max_waiting < 0:
            raise ValueError("max_concurrent must be at least 1 and max_waiting not negative")
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self._running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=32)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead drained at the recent pace."""
        typical = (
            sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 1.0
        )
        ahead = self.waiting + 1
        return float(max(1, math.ceil(typical * ahead / self.max_concurrent)))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._running >= self.max_concurrent or self._waiters:
            if len(self._waiters) >= self.max_waiting:
                raise SandboxBusy(self.retry_after())
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    # The slot was handed to us as we were cancelled: pass it on.
                    self._release()
                raise
        else:
            self._running += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield
        finally:
            self._recent_seconds.append(loop.time() - started)
            self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self._running -= 1
