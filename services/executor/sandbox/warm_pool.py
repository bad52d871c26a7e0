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

A run that finds its key's pool empty while a refill's start is under way waits for that sandbox
(`take_or_wait`) rather than starting one of its own: the refill's start is already part done,
so back-to-back runs that outpace the refill no longer get their slowest answers from starting a
sandbox from nothing beside it. One run waits for each start under way; another starts its own.
A run that waits also has one more sandbox started for the pool beside the refill's next (at most
one such extra start per key at a time), so that the pool can get ahead of back-to-back runs
again rather than each waiting for the start before it.

A burst deepens a key's pool: a take that finds it empty makes that key's depth BURST_DEPTH times
the pool's size, so that sustained concurrency finds sandboxes ready instead of starting them on the runs'
path; once no take has found it empty for `burst_seconds`, the key is back to its size and the
extra sandboxes are disposed of, so an idle mesh holds only its base pools (`make bench`, third
session: a base of 2 deepened to 8 gave 42-46 runs/s at concurrency 8 where a fixed 2 gave 37; the
executor's default base is 4 since the ninth, see the README's Speed)."""

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
        # Keys whose refill is starting a sandbox now (not waiting to retry after a failure), and
        # the run waiting for that sandbox, if one is.
        self._starting: set[K] = set()
        self._waiting: dict[K, asyncio.Future[S | None]] = {}
        self._extras: dict[K, asyncio.Task[None]] = {}  # the extra start of a key whose run waits
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
        for task in (self._refills.pop(key, None), self._extras.pop(key, None)):
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

    async def take_or_wait(self, key: K) -> S | None:
        """`take`; or, when the pool is empty but its refill is starting a sandbox that no other run
        waits for, that sandbox once it is up. None: there is none to be had (start one)."""
        sandbox = self.take(key)
        if sandbox is not None or key not in self._starting or key in self._waiting:
            return sandbox
        waiter: asyncio.Future[S | None] = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        self._start_extra(key)
        try:
            sandbox = await waiter
        except asyncio.CancelledError:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]
            if waiter.done() and not waiter.cancelled() and (handed := waiter.result()) is not None:
                self.add(key, handed)  # handed over as the run was cancelled: back to the pool
            raise
        if sandbox is not None and self._exited(sandbox).done():
            self._dispose(sandbox)
            return None
        return sandbox

    def _start_extra(self, key: K) -> None:
        if key in self._extras or self._closed:
            return

        async def extra() -> None:
            try:
                sandbox = await self._start(key)
            except SandboxError:
                return  # the refill's own starts report and retry what fails
            self._deliver(key, sandbox)

        task = asyncio.get_running_loop().create_task(extra())
        self._extras[key] = task

        def ended(done: asyncio.Task[None]) -> None:
            if self._extras.get(key) is done:  # not one started after a forget of the key
                del self._extras[key]

        task.add_done_callback(ended)

    def _deliver(self, key: K, sandbox: S) -> None:
        """A started sandbox: to the run waiting for one, else to the pool (which disposes of it
        once closed or full)."""
        if self._closed or not self._hand_over(key, sandbox):
            self.add(key, sandbox)

    def _hand_over(self, key: K, sandbox: S | None) -> bool:
        """Give a refill's sandbox (None: its start failed) to the run waiting for it, if one is."""
        waiter = self._waiting.pop(key, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(sandbox)
        return True

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
        for key in list(self._waiting):
            self._hand_over(key, None)
        refills = [*self._refills.values(), *self._extras.values()]
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
        try:
            while not self._closed and key in self._ready and len(self._ready[key]) < self.size_of(key):
                self._starting.add(key)
                try:
                    sandbox = await self._start(key)
                except SandboxError as error:
                    self._starting.discard(key)
                    self._hand_over(key, None)  # the waiting run starts its own, and hears why
                    log.warning("cannot refill the warm pool (%s): %s", key, error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_retry_delay)
                    continue
                delay = self._retry_delay
                self._deliver(key, sandbox)
        finally:
            self._starting.discard(key)
            self._hand_over(key, None)

    def _drop_dead(self, key: K, sandbox: S) -> None:
        """A pooled sandbox that died while waiting (killed from outside) leaves the pool."""
        pool = self._ready.get(key)
        if pool is not None and sandbox in pool:
            pool.remove(sandbox)
            self._dispose(sandbox)
            self._refill(key)
