"""The warm pool on its own, with real processes as its "sandboxes" (`sleep`): pre-started per key,
taken once, refilled only when asked (or when a take found it empty), dead ones dropped and replaced,
failures retried, and nothing left running after close."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.executor.sandbox.interface import SandboxError
from services.executor.sandbox.warm_pool import BURST_DEPTH, WarmPool


class Sleeper:
    """A started `sleep` process standing in for a sandbox."""

    def __init__(self, key: str, process: asyncio.subprocess.Process) -> None:
        self.key = key
        self.process = process
        self.exited: asyncio.Future[int] = asyncio.ensure_future(process.wait())


class Processes:
    def __init__(self) -> None:
        self.started: list[Sleeper] = []
        self.disposed: list[Sleeper] = []
        self.failures_left = 0
        # While set, each start waits until the gate opens (a start under way).
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def start(self, key: str) -> Sleeper:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise SandboxError("cannot start (on purpose)")
        process = await asyncio.create_subprocess_exec("sleep", "60")
        sleeper = Sleeper(key, process)
        self.started.append(sleeper)
        return sleeper

    def dispose(self, sleeper: Sleeper) -> None:
        self.disposed.append(sleeper)
        if sleeper.process.returncode is None:
            sleeper.process.kill()

    def alive(self) -> list[Sleeper]:
        return [s for s in self.started if s.process.returncode is None and _exists(s.process.pid)]


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def in_a_loop(scenario: Callable[[Processes], Awaitable[None]]) -> Callable[[], None]:
    """Run an async scenario on a fresh event loop (the project's tests use asyncio.run), killing
    whatever it left running even when it fails."""

    def test() -> None:
        async def main() -> None:
            processes = Processes()
            try:
                await scenario(processes)
            finally:
                # A snapshot: a failed scenario leaves its pool open, whose refills would start
                # more while this waits (the loop then closes and stops them).
                for sleeper in list(processes.started):
                    if sleeper.process.returncode is None:
                        sleeper.process.kill()
                        await sleeper.process.wait()

        asyncio.run(main())

    test.__name__, test.__doc__ = (
        scenario.__name__,
        scenario.__doc__,
    )  # not wraps: pytest would see its argument
    return test


def make_pool(processes: Processes, size: int = 2, **options: Any) -> WarmPool[str, Sleeper]:
    return WarmPool(size, processes.start, processes.dispose, lambda s: s.exited, **options)


@in_a_loop
async def test_fill_starts_size_sandboxes_per_key_and_take_hands_each_out_once(processes: Processes) -> None:
    pool = make_pool(processes)
    pool.keep_warm(["python", "bash"])
    await pool.fill(2)
    assert (pool.ready("python"), pool.ready("bash")) == (2, 2)
    first, second = pool.take("python"), pool.take("python")
    assert first is not None and second is not None and first is not second
    assert first.key == second.key == "python"
    assert pool.take("other") is None  # a key that is not kept warm is never pooled
    await pool.close()


@in_a_loop
async def test_keys_kept_as_recently_used_are_warm_and_the_least_recent_is_forgotten(
    processes: Processes,
) -> None:
    """What both kinds of backend do for profiles with a package environment: the last `count`."""
    pool = make_pool(processes, size=1)
    pool.keep_warm(["default"])
    for key in ("env-a", "env-b", "env-a", "env-c"):
        pool.keep_recently_used(key, 2)
    await pool.fill(1)
    # env-b was used least recently when env-c came: forgotten, its sandbox disposed of.
    assert sorted(pool.keys()) == ["default", "env-a", "env-c"]
    assert [pool.ready(key) for key in ("default", "env-a", "env-c")] == [1, 1, 1]
    assert pool.take("env-b") is None
    assert [s.key for s in processes.alive()].count("env-b") == 0
    await pool.close()


@in_a_loop
async def test_refill_happens_when_asked_not_on_take(processes: Processes) -> None:
    pool = make_pool(processes)
    pool.keep_warm(["python"])
    await pool.fill(2)
    assert pool.take("python") is not None
    await asyncio.sleep(0.2)
    assert pool.ready("python") == 1 and len(processes.started) == 2  # no start on the run's path
    pool.replenish()  # what the backend calls once the answer is sent
    await pool.fill(2)
    assert pool.ready("python") == 2 and len(processes.started) == 3
    await pool.close()


@in_a_loop
async def test_a_key_can_be_kept_deeper_than_the_pools_size(processes: Processes) -> None:
    pool = make_pool(processes, size=1)
    pool.keep_warm(["python"])
    pool.keep_warm(["python with packages"], size=3)
    await pool.fill(5)
    assert (pool.ready("python"), pool.ready("python with packages")) == (1, 3)
    assert pool.size_of("python with packages") == 3 and pool.size_of("python") == 1
    taken = [pool.take("python with packages") for _ in range(2)]
    assert all(taken) and pool.ready("python with packages") == 1
    pool.replenish()
    await pool.fill(5)
    assert pool.ready("python with packages") == 3 and len(processes.started) == 6
    pool.forget("python with packages")
    assert pool.size_of("python with packages") == 1  # forgotten, its depth too
    await pool.close()


@in_a_loop
async def test_a_take_that_empties_the_pool_refills_at_once(processes: Processes) -> None:
    pool = make_pool(processes, size=1)
    pool.keep_warm(["python"])
    await pool.fill(1)
    assert pool.take("python") is not None
    await pool.fill(1)  # without replenish: the take found the pool dry and started a refill
    assert pool.ready("python") == 1
    await pool.close()


async def _emptied_with_a_start_under_way(processes: Processes) -> WarmPool[str, Sleeper]:
    """A pool of one, taken: its refill's start is under way, held at the gate."""
    pool = make_pool(processes, size=1)
    pool.keep_warm(["python"])
    await pool.fill(1)
    processes.gate = asyncio.Event()
    assert pool.take("python") is not None  # the last one: the refill starts at once
    await asyncio.sleep(0.01)
    return pool


@in_a_loop
async def test_a_run_that_finds_the_pool_empty_waits_for_the_start_under_way(processes: Processes) -> None:
    """It gets the first sandbox that is up, and one more start is made for the pool beside the
    refill's (not more, whoever waits); a second run meanwhile (that start is promised) is told to
    start its own."""
    pool = await _emptied_with_a_start_under_way(processes)
    waiting = asyncio.ensure_future(pool.take_or_wait("python"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert processes.calls == 3  # the fill's, the refill's, and the extra one for the pool
    assert await pool.take_or_wait("python") is None  # one run waits for each start under way
    assert processes.calls == 3  # and no other extra start for it
    assert processes.gate is not None
    processes.gate.set()
    handed = await asyncio.wait_for(waiting, 5)
    assert handed in processes.started[1:] and handed.process.returncode is None
    # The refill goes on (deeper now: a take found the pool empty, a burst).
    assert pool.size_of("python") == BURST_DEPTH
    await pool.fill(1)
    assert pool.ready("python") >= 1 and handed not in processes.disposed
    await pool.close()


@in_a_loop
async def test_a_waiting_run_that_is_cancelled_leaves_its_sandbox_to_the_pool(processes: Processes) -> None:
    pool = await _emptied_with_a_start_under_way(processes)
    waiting = asyncio.ensure_future(pool.take_or_wait("python"))
    await asyncio.sleep(0.01)
    waiting.cancel()
    assert processes.gate is not None
    processes.gate.set()
    await pool.fill(2)
    assert pool.ready("python") >= 2 and processes.disposed == []  # the refill's and the extra: kept
    await pool.close()


@in_a_loop
async def test_a_waiting_run_hears_none_when_the_start_fails_or_the_pool_closes(processes: Processes) -> None:
    pool = await _emptied_with_a_start_under_way(processes)
    processes.failures_left = 2  # the refill's start and the extra one
    waiting = asyncio.ensure_future(pool.take_or_wait("python"))
    await asyncio.sleep(0.01)
    assert processes.gate is not None
    processes.gate.set()
    assert await asyncio.wait_for(waiting, 5) is None  # it starts its own, and hears why
    processes.gate = asyncio.Event()
    for _ in range(500):  # the refill retries after its delay, and is held at the gate again
        if processes.calls == 4:
            break
        await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(pool.take_or_wait("python"))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # waiting for that start, until the pool closes
    await pool.close()
    assert await asyncio.wait_for(waiting, 5) is None


@in_a_loop
async def test_a_burst_deepens_a_key_and_idleness_takes_it_back(processes: Processes) -> None:
    now = [0.0]
    pool = make_pool(processes, size=2, burst_seconds=30, clock=lambda: now[0])
    pool.keep_warm(["python", "bash"])
    pool.keep_warm(["python with packages"], size=3)
    await pool.fill(3)
    taken = [pool.take("python") for _ in range(2)]
    assert all(taken) and pool.size_of("python") == 2  # emptied, not yet found empty
    assert pool.take("python") is None  # found empty: the key is kept BURST_DEPTH times deeper
    deep = BURST_DEPTH * 2
    assert pool.size_of("python") == deep and pool.size_of("bash") == 2
    assert pool.take("python") is None and pool.size_of("python") == deep  # no deeper than that
    for _ in range(4):
        pool.take("python with packages")
    assert pool.size_of("python with packages") == deep  # a deeper key: to the same bound
    pool.replenish()
    await pool.fill(deep)
    assert pool.ready("python") == deep
    now[0] = 29.0
    pool.replenish()
    assert pool.size_of("python") == deep  # a take found it empty less than 30 s ago
    now[0] = 31.0
    disposed = len(processes.disposed)
    pool.replenish()
    assert pool.size_of("python") == 2 and pool.ready("python") == 2
    assert pool.size_of("python with packages") == 3
    extras = sorted(s.key for s in processes.disposed[disposed:])
    assert extras == ["python"] * (deep - 2) + ["python with packages"] * (deep - 3)
    await pool.close()


@in_a_loop
async def test_a_sandbox_that_dies_while_pooled_is_dropped_and_replaced(processes: Processes) -> None:
    pool = make_pool(processes, size=1)
    pool.keep_warm(["python"])
    await pool.fill(1)
    victim = processes.started[0]
    victim.process.kill()
    await victim.exited
    await asyncio.sleep(0)
    assert victim in processes.disposed
    await pool.fill(1)
    replacement = pool.take("python")
    assert replacement is not None and replacement is not victim
    await pool.close()


@in_a_loop
async def test_a_failing_start_is_retried_with_a_delay(processes: Processes) -> None:
    processes.failures_left = 2
    pool = make_pool(processes, size=1, retry_delay=0.01)
    pool.keep_warm(["python"])
    await asyncio.wait_for(pool.fill(1), 5)
    assert pool.ready("python") == 1 and processes.failures_left == 0
    await pool.close()


@in_a_loop
async def test_close_leaves_no_process_and_disposes_late_starts(processes: Processes) -> None:
    pool = make_pool(processes, size=3)
    pool.keep_warm(["python", "bash"])
    await pool.fill(1)  # some started, others still starting
    await pool.close()
    await asyncio.gather(*(s.exited for s in processes.started))
    assert processes.alive() == []
    assert set(processes.disposed) == set(processes.started)
    assert pool.take("python") is None
    pool.replenish()
    await asyncio.sleep(0.1)
    assert all(s.process.returncode is not None for s in processes.started)  # nothing new after close


@in_a_loop
async def test_forget_disposes_a_keys_sandboxes(processes: Processes) -> None:
    pool = make_pool(processes, size=1)
    pool.keep_warm(["python", "bash"])
    await pool.fill(1)
    pool.forget("bash")
    assert pool.keys() == ["python"]
    assert [s.key for s in processes.disposed] == ["bash"]
    await pool.close()


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        WarmPool(-1, lambda key: asyncio.sleep(0), lambda s: None, lambda s: asyncio.Future())


def _command_line(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def test_no_sleep_processes_of_this_test_remain() -> None:
    # Only this module's stand-ins: in a whole run, other tests' meshes are children of pytest too.
    own = str(os.getpid())
    leftovers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().split(") ")[1].split()
            except OSError:
                continue
            if fields[1] == own and fields[0] != "Z" and _command_line(entry) == ["sleep", "60"]:
                leftovers.append(entry)
    assert leftovers == []
