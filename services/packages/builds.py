"""The build worker: one build per requirement set at a time, run in the background so that the API
answers at once (`pending`, then `building`), resumed after a restart, and the garbage collection
of environments that no user's list names any more.

A build resolves the set to a lock (exact versions and hashes), then makes the lock's environment
unless an equal lock already made it: two sets that resolve alike share one environment, and a
set already built is never built again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.packages import storage
from services.packages.environments import (
    BuildFailed,
    BuildLimits,
    EnvironmentStore,
    Installer,
    Target,
)
from services.packages.storage import BUILDING, FAILED, READY, BuildState
from services.platform.db import Database

log = logging.getLogger("pythonon.packages.builds")

INTERNAL_FAILURE = "the build failed for a reason on the server's side; change the list to try again"


@dataclass(frozen=True)
class Progress:
    ready: int
    total: int


class Builds:
    def __init__(
        self,
        db: Database,
        store: EnvironmentStore,
        installer: Installer,
        target: Target,
        limits: BuildLimits,
        max_concurrent: int,
    ) -> None:
        self._db = db
        self._store = store
        self._installer = installer
        self._target = target
        self._limits = limits
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, Progress] = {}
        # Environments being made: the collector leaves them alone until their build is recorded.
        self._making: set[str] = set()
        self._collecting = asyncio.Lock()
        self._collector: asyncio.Task[None] | None = None
        self._collect_again = False
        self._closed = False
        # How many environments were installed (not found already made) since start: for tests and logs.
        self.installed = 0

    def start(self, build: BuildState) -> None:
        """Build `build`'s set in the background unless it is being built already."""
        if self._closed or build.set_key in self._running:
            return
        task = asyncio.get_running_loop().create_task(self._build(build))
        self._running[build.set_key] = task
        task.add_done_callback(lambda _task: self._finished(build.set_key))

    async def resume(self) -> None:
        """Start every build a user wants that has not finished (interrupted by a stop)."""
        for build in await self._db.run(storage.unfinished_builds):
            self.start(build)

    def progress(self, build: BuildState) -> Progress:
        known = self._progress.get(build.set_key)
        if known is not None:
            return known
        total = len(build.versions) or len(build.requirements)
        return Progress(total if build.status == READY else 0, total)

    async def wait(self, set_key: str, seconds: float) -> None:
        """Wait up to `seconds` for the set's build to end (at once if it is not running here)."""
        task = self._running.get(set_key)
        if task is not None and seconds > 0:
            await asyncio.wait((task,), timeout=seconds)

    def collect_soon(self) -> None:
        """Remove, in the background, the builds and environments no user's list names."""
        if self._closed:
            return
        if self._collector is not None and not self._collector.done():
            # The collection running now may have read the lists before this change: once more.
            self._collect_again = True
            return
        self._collector = asyncio.get_running_loop().create_task(self._collect_until_current())

    async def _collect_until_current(self) -> None:
        while True:
            self._collect_again = False
            try:
                await self.collect()
            except Exception:
                log.exception("collecting unused package environments failed")
            if not self._collect_again:
                return

    async def collect(self) -> list[str]:
        """Remove what no list names; returns the environment keys removed."""
        async with self._collecting:
            kept = await self._db.run(storage.collect_unwanted)
            removed = []
            for key in self._store.keys():
                if key not in kept and key not in self._making:
                    await asyncio.to_thread(self._store.remove, key)
                    removed.append(key)
            if removed:
                log.info("removed unused package environments", extra={"count": len(removed)})
                if not self._making:  # a build in progress may be about to link a cache entry
                    await asyncio.to_thread(self._store.prune_bytecode)
            builder = self._installer.source_builder
            if builder is not None and not self._running:
                # On the event loop, at once after the check: no build may start in between and
                # take a wheel this removes (a few directories of one wheel each).
                pruned = builder.prune(self._store.pinned())
                if pruned:
                    log.info(
                        "removed wheels built from source that no environment pins, or stale build environments",
                        extra={"count": pruned},
                    )
            return removed

    async def close(self) -> None:
        """Stop every build (each is resumed at the next start) and the collector."""
        self._closed = True
        tasks = [*self._running.values(), *([self._collector] if self._collector else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, set_key: str) -> None:
        self._running.pop(set_key, None)
        self._progress.pop(set_key, None)

    async def _build(self, build: BuildState) -> None:
        key = build.set_key
        self._progress[key] = Progress(0, len(build.requirements))
        async with self._slots:
            await self._db.run(lambda session: storage.set_build(session, key, BUILDING))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._limits.max_seconds
            environment_key = ""
            try:
                lock = await self._installer.resolve(build.requirements, self._target, deadline)
                total = len(lock.versions)
                self._progress[key] = Progress(0, total)
                environment_key = lock.environment_key(self._target)
                self._making.add(environment_key)
                made_before = self._store.exists(environment_key)

                def on_progress(count: int) -> None:
                    self._progress[key] = Progress(min(count, total), total)

                await self._store.build(
                    self._installer, lock, self._target, self._limits, deadline, on_progress
                )
                if not made_before:
                    self.installed += 1
                await self._db.run(
                    lambda session: storage.set_build(
                        session, key, READY, environment_key=environment_key, versions=lock.versions
                    )
                )
                log.info(
                    "package environment ready",
                    extra={"packages": total, "reused": made_before, "environment": environment_key[:16]},
                )
            except BuildFailed as failure:
                reason = str(failure)
                await self._db.run(lambda session: storage.set_build(session, key, FAILED, reason=reason))
                log.info("package build failed", extra={"set": key[:16]})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("package build failed unexpectedly", extra={"set": key[:16]})
                await self._db.run(
                    lambda session: storage.set_build(session, key, FAILED, reason=INTERNAL_FAILURE)
                )
            finally:
                self._making.discard(environment_key)
