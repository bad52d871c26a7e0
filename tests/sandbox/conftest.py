"""Starting a sandbox backend for tests, driven from an event loop of its own in a
background thread (so that the warm pool refills between tests, as it would in the service).

The canary is set in this process's environment before any backend exists: no sandbox may see it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from services.executor.sandbox import RunResult, RunSpec, SandboxBackend, SandboxUnavailable, create_backend

CANARY_NAME = "PYTHONON_CANARY"
CANARY_VALUE = "leak-me"
os.environ[CANARY_NAME] = CANARY_VALUE

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sandbox-tests", daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Sandbox:
    """A started backend and a synchronous way to use it."""

    def __init__(self, loop: LoopThread, backend: SandboxBackend) -> None:
        self.loop = loop
        self.backend = backend

    def run(self, spec: RunSpec) -> RunResult:
        async def run_and_replenish() -> RunResult:
            try:
                return await self.backend.run(spec)
            finally:
                self.backend.replenish()  # as the executor does once the answer is sent

        return self.loop.call(run_and_replenish())

    def python(self, code: str, **fields: Any) -> RunResult:
        return self.run(RunSpec("python", code, **fields))

    def gather(self, specs: list[RunSpec]) -> list[RunResult | BaseException]:
        async def all_runs() -> list[RunResult | BaseException]:
            return await asyncio.gather(*(self.backend.run(s) for s in specs), return_exceptions=True)

        return self.loop.call(all_runs())

    def assert_healthy(self) -> None:
        """The next run after an attack answers normally."""
        result = self.python("print('still fine')")
        assert (result.stdout, result.stderr, result.exit_code, result.timed_out) == (
            "still fine\n",
            "",
            0,
            False,
        )


@contextlib.contextmanager
def started_backend(name: str, **options: Any) -> Iterator[Sandbox]:
    """A started backend, closed afterwards; the test is skipped when the host cannot run it."""
    loop = LoopThread()
    try:
        try:
            backend = create_backend(name, **options)
            loop.call(backend.start())
        except SandboxUnavailable as error:
            pytest.skip(f"the {name} sandbox cannot run on this host: {error}")
        try:
            yield Sandbox(loop, backend)
        finally:
            loop.call(backend.close())
    finally:
        loop.stop()


@dataclass(frozen=True)
class BackendFactory:
    """How the contract suite starts one backend: its name and the options of the suite's shared
    instance; a test that needs other options (saturation, no pool) passes overrides."""

    name: str
    options: Mapping[str, Any]
    label: str = ""  # the test id, when two factories start the same backend

    @property
    def id(self) -> str:
        return self.label or self.name

    def __call__(self, **overrides: Any) -> contextlib.AbstractContextManager[Sandbox]:
        return started_backend(self.name, **{**self.options, **overrides})


# Enough room for the runs-in-parallel test; saturation tests make a backend of their own.
bwrap_factory = BackendFactory(
    "bwrap", {"pool_size": 2, "max_concurrent": 24, "max_runs_per_user": 24, "max_waiting_per_user": 8}
)
# The same backend with each runtime's files gathered into one tree (staged_root.py), as the
# executor runs it in a mount namespace of its own; here the tree's mounts are in the tests' own.
bwrap_staged_factory = BackendFactory("bwrap", {**bwrap_factory.options, "staged_root": True}, "bwrap-staged")
gvisor_factory = BackendFactory(
    "gvisor", {"pool_size": 2, "max_concurrent": 12, "max_runs_per_user": 12, "max_waiting_per_user": 24}
)
