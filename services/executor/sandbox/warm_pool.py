"""Pre-started, single-use sandboxes, kept per key (a backend's key says what must be fixed when a
sandbox starts: the language and the limits profile), so that a run takes one that is already up
instead of paying for its start.

The pool knows nothing of what a sandbox is: the backend gives it how to start one, how to dispose
of one (kill it and, in the background, release what it holds) and the future that completes when
one dies. A run takes a sandbox with `take`; the pool is refilled by `replenish`, which the
backend calls once the run's answer is on its way, so that starting replacements does not compete
with the run itself, or at once when a take found the key's pool empty. A pooled sandbox that dies
while it waits is dropped and replaced. `close` disposes of every pooled sandbox and of any that
finishes starting afterwards.

A burst deepens a key's pool: a take that finds it empty makes that key's depth BURST_DEPTH times
the pool's size, so that sustained concurrency finds sandboxes ready instead of starting them on the runs'
path; once no take has found it empty for `burst_seconds`, the key is back to its size and the
extra sandboxes are disposed of, so an idle mesh holds only its base pools (`make bench`: a base of
2 deepened to 8 gave 42-46 runs/s at concurrency 8 where a fixed 4 gave 44 and a fixed 2 gave 37,
while the idle mesh holds 593 MiB of PSS against 613 with a fixed 4)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from services.executor.sandbox.interface import SandboxError

log = logging.getLogger("pythonon.executor.sandbox.warm_pool")

# How many times its size a burst makes a key's pool.
BURST_DEPTH = 4
K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


class WarmPool(Generic[K, S]):
    def __init__(
        self,
        size: int,
        start: Callable[[K], Awaitable[S]],
        dispose: Callable[[S], None],
        exited: Callable[[S], asyncio.Future[Any]],
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        burst_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`size` sandboxes per key (0: no pool, `take` always answers None). `start` raises
        SandboxError when a sandbox cannot start; the pool then retries with a growing delay."""
        if size < 0:
            raise ValueError("a warm pool's size must not be negative")
        self.size = size
        self._start = start
        self._dispose = dispose
        self._exited = exited
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._ready: dict[K, deque[S]] = {}
        self._sizes: dict[K, int] = {}  # keys kept at another size than `size`
        self._refills: dict[K, asyncio.Task[None]] = {}
        self._recent: dict[K, None] = {}  # keep_recently_used's keys, least recently used first
        # Keys in a burst: when a take last found each empty.
        self._dry_at: dict[K, float] = {}
        self._burst_seconds = burst_seconds
        self._clock = clock
        self._closed = False

    def keep_warm(self, keys: Iterable[K], size: int | None = None) -> None:
        """The keys the pool holds sandboxes for (others are never pooled); refilled from now on,
        each to `size` sandboxes (default: the pool's size)."""
        for key in keys:
            self._ready.setdefault(key, deque())
            if size is not None:
                self._sizes[key] = size
        self.replenish()

    def keep_recently_used(self, key: K, count: int, size: int | None = None) -> None:
        """Keep `key` warm (to `size` sandboxes, default the pool's size) as one of the `count` keys
        last used through this call (e.g. profiles that mount a user's package environment); the
        least recently used beyond that is forgotten."""
        known = key in self._recent
        self._recent.pop(key, None)
        self._recent[key] = None
        if not known and not self._closed:
            self.keep_warm([key], size=size)
        while len(self._recent) > count:
            oldest = next(iter(self._recent))
            del self._recent[oldest]
            self.forget(oldest)

    def size_of(self, key: K) -> int:
        """The depth `key` is kept at now: its size, or in a burst BURST_DEPTH times the pool's size
        (a key kept deeper than that already, e.g. a package environment's, stays as it is, so that
        bursts stay bounded)."""
        base = self._sizes.get(key, self.size)
        return max(base, BURST_DEPTH * self.size) if key in self._dry_at and base > 0 else base

    def forget(self, key: K) -> None:
        """Stop keeping `key` warm and dispose of its sandboxes."""
        task = self._refills.pop(key, None)
        if task is not None:
            task.cancel()
        self._sizes.pop(key, None)
        self._dry_at.pop(key, None)
        for sandbox in self._ready.pop(key, deque()):
            self._dispose(sandbox)

    def keys(self) -> list[K]:
        return list(self._ready)

    def ready(self, key: K) -> int:
        """How many live sandboxes wait for `key`."""
        return len(self._ready.get(key, ()))

    def add(self, key: K, sandbox: S) -> None:
        """Put a started sandbox in the pool (e.g. one started by a start-up check)."""
        pool = self._ready.get(key)
        if self._closed or pool is None or len(pool) >= self.size_of(key):
            self._dispose(sandbox)
            return
        pool.append(sandbox)
        self._exited(sandbox).add_done_callback(lambda _: self._drop_dead(key, sandbox))

    def take(self, key: K) -> S | None:
        """A live warm sandbox for `key`, now; None when there is none (or `key` is not pooled)."""
        pool = self._ready.get(key)
        if pool is None or self._closed:
            return None
        while pool:
            sandbox = pool.popleft()
            if not self._exited(sandbox).done():
                if not pool:
                    # Ran dry: refill now; otherwise `replenish`, after the answer, does it.
                    self._refill(key)
                return sandbox
            self._dispose(sandbox)
        self._dry_at[key] = self._clock()  # a burst: kept deeper from now on
        self._refill(key)
        return None

    def replenish(self) -> None:
        """Start, in the background, what every key lacks; let a burst's extra depth go once no
        take has found its key empty for `burst_seconds`."""
        now = self._clock()
        for key in [key for key, since in self._dry_at.items() if now - since >= self._burst_seconds]:
            self._shallow(key)
        for key, pool in self._ready.items():
            if len(pool) < self.size_of(key):
                self._refill(key)

    def _shallow(self, key: K) -> None:
        self._dry_at.pop(key, None)
        pool = self._ready.get(key)
        while pool is not None and len(pool) > self.size_of(key):
            self._dispose(pool.pop())

    async def fill(self, count: int = 1) -> None:
        """Wait until every key has `count` sandboxes (at most its size) or its refill gave up."""
        self.replenish()
        while not self._closed:
            pending = [
                task
                for key, task in self._refills.items()
                if not task.done() and len(self._ready.get(key, ())) < min(count, self.size_of(key))
            ]
            if not pending:
                return
            await asyncio.wait(pending, timeout=0.05)

    async def close(self) -> None:
        self._closed = True
        refills = list(self._refills.values())
        for task in refills:
            task.cancel()
        await asyncio.gather(*refills, return_exceptions=True)
        self._refills.clear()
        for pool in self._ready.values():
            while pool:
                self._dispose(pool.popleft())

    def _refill(self, key: K) -> None:
        if self._closed or self.size_of(key) <= 0 or key not in self._ready:
            return
        task = self._refills.get(key)
        if task is None or task.done():
            self._refills[key] = asyncio.get_running_loop().create_task(self._refill_loop(key))

    async def _refill_loop(self, key: K) -> None:
        delay = self._retry_delay
        while not self._closed and key in self._ready and len(self._ready[key]) < self.size_of(key):
            try:
                sandbox = await self._start(key)
            except SandboxError as error:
                log.warning("cannot refill the warm pool (%s): %s", key, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay)
                continue
            delay = self._retry_delay
            self.add(key, sandbox)

    def _drop_dead(self, key: K, sandbox: S) -> None:
        """A pooled sandbox that died while waiting (killed from outside) leaves the pool."""
        pool = self._ready.get(key)
        if pool is not None and sandbox in pool:
            pool.remove(sandbox)
            self._dispose(sandbox)
            self._refill(key)
