"""The fair admission of runs on its own: slots handed out round-robin across users, a per-user cap,
a wait bounded by its expected length (past it, SandboxBusy with that wait as the retry delay), a
caller that goes away leaves the line, and no slot is ever lost or doubled. Then the sizing of the
slots from memory and cores, read from a /proc and cgroup tree made for the test."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.executor.sandbox import BackendOptionError, Limits, backend_options
from services.executor.sandbox.admission import (
    INITIAL_RUN_SECONDS,
    Admission,
    available_cores,
    available_memory_bytes,
    host_capacity,
)
from services.executor.sandbox.interface import SandboxBusy

MiB = 1024 * 1024


class Runs:
    """Runs that hold their slot until the test lets them finish, recording the order they started
    in and the most that ever ran at once (in all, and per user)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.started: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.peak = 0
        self.peak_of: dict[str, int] = {}
        self._now = 0
        self._now_of: dict[str, int] = {}

    def submit(self, name: str) -> asyncio.Task[None]:
        """Run `name` (its user is its first letter) until `finish[name]` is set."""
        user = name[0]
        self.finish[name] = asyncio.Event()

        async def run() -> None:
            async with self.admission.slot(user):
                self.started.append(name)
                self._now += 1
                self._now_of[user] = self._now_of.get(user, 0) + 1
                self.peak = max(self.peak, self._now)
                self.peak_of[user] = max(self.peak_of.get(user, 0), self._now_of[user])
                try:
                    await self.finish[name].wait()
                finally:
                    self._now -= 1
                    self._now_of[user] -= 1

        self.tasks[name] = asyncio.get_running_loop().create_task(run())
        return self.tasks[name]

    async def done(self, name: str) -> None:
        self.finish[name].set()
        await self.tasks[name]
        await settle()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def scenario(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_runs_start_at_once_up_to_the_slots_then_wait_and_nothing_leaks() -> None:
    async def body() -> None:
        admission = Admission(slots=3, per_user=3, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        for name in ("a1", "a2", "a3", "a4", "a5"):
            runs.submit(name)
        await settle()
        assert runs.started == ["a1", "a2", "a3"]
        assert (admission.running, admission.waiting) == (3, 2)
        await runs.done("a2")
        assert runs.started == ["a1", "a2", "a3", "a4"]
        for name in ("a1", "a3", "a4", "a5"):
            await runs.done(name)
        assert runs.peak == 3
        assert (admission.running, admission.waiting) == (0, 0)
        assert admission.running_of("a") == 0 and admission.waiting_of("a") == 0

    scenario(body)


def test_waiting_runs_are_served_round_robin_across_users() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        runs.submit("a0")
        await settle()
        for name in ("a1", "a2", "a3", "a4", "b1", "c1", "b2"):
            runs.submit(name)
            await settle()
        for name in ("a0", "a1", "b1", "c1", "a2", "b2", "a3", "a4"):
            await runs.done(name)
        # B's first run waits for one of A's, not for A's four.
        assert runs.started == ["a0", "a1", "b1", "c1", "a2", "b2", "a3", "a4"]
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_a_user_at_the_cap_waits_while_another_user_takes_a_free_slot_at_once() -> None:
    async def body() -> None:
        admission = Admission(slots=4, per_user=2, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        for name in ("a1", "a2", "a3", "a4", "a5"):
            runs.submit(name)
        await settle()
        # Alone, A borrows an idle slot beyond its cap, but the last one stays free.
        assert runs.started == ["a1", "a2", "a3"]
        assert (admission.running, admission.waiting_of("a")) == (3, 2)
        runs.submit("b1")
        await settle()
        assert runs.started == ["a1", "a2", "a3", "b1"]  # the newcomer starts at once
        await runs.done("a1")
        # A is at its cap and lending would take the last free slot: it stays free.
        assert runs.started == ["a1", "a2", "a3", "b1"]
        runs.submit("b2")
        await settle()
        assert runs.started == ["a1", "a2", "a3", "b1", "b2"]
        await runs.done("a2")
        assert runs.started == ["a1", "a2", "a3", "b1", "b2", "a4"]  # A below its cap again
        for name in ("b1", "b2", "a3", "a4", "a5"):
            await runs.done(name)
        assert runs.peak_of == {"a": 3, "b": 2}
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_two_users_flooding_are_each_held_to_their_cap() -> None:
    async def body() -> None:
        admission = Admission(slots=4, per_user=2, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        for number in range(1, 5):
            runs.submit(f"a{number}")
            runs.submit(f"b{number}")
        await settle()
        assert sorted(runs.started) == ["a1", "a2", "b1", "b2"]
        for finished in ("a1", "b1", "a2", "b2"):
            await runs.done(finished)
            assert admission.running_of("a") <= 2 and admission.running_of("b") <= 2
        assert sorted(runs.started) == ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]
        for name in ("a3", "a4", "b3", "b4"):
            await runs.done(name)
        assert runs.peak_of == {"a": 2, "b": 2}
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_past_the_bound_a_run_is_refused_with_its_expected_wait_but_another_user_still_queues() -> None:
    async def body() -> None:
        assert INITIAL_RUN_SECONDS == 1.0  # runs are taken to last a second before any finished
        admission = Admission(slots=1, per_user=1, max_wait_seconds=3, max_waiting_per_user=10)
        runs = Runs(admission)
        runs.submit("a0")
        await settle()
        # A's n-th waiting run waits for n of A's runs: 1, 2, 3 seconds; the fourth would wait 4.
        for name, expected in (("a1", 1.0), ("a2", 2.0), ("a3", 3.0)):
            assert admission.expected_wait("a") == expected
            runs.submit(name)
            await settle()
        assert admission.expected_wait("a") == 4.0
        with pytest.raises(SandboxBusy) as refused:
            async with admission.slot("a"):
                raise AssertionError("admitted past the bound")
        assert refused.value.retry_after == 4.0
        assert "expected wait for a run slot is 4.0 s (bound 3 s)" in str(refused.value)
        # B's run goes after a0 and one of A's waiting runs, not after all three.
        assert admission.expected_wait("b") == 2.0
        runs.submit("b1")
        await settle()
        assert admission.waiting == 4
        for name in ("a0", "a1", "b1", "a2", "a3"):
            await runs.done(name)
        assert runs.started == ["a0", "a1", "b1", "a2", "a3"]
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_the_expected_wait_follows_how_long_runs_take() -> None:
    async def body() -> None:
        admission = Admission(slots=2, per_user=2, max_wait_seconds=30, max_waiting_per_user=10)
        for _ in range(3):
            async with admission.slot("a"):
                await asyncio.sleep(0.05)
        assert 0.04 < admission.typical_run_seconds() < 0.5
        runs = Runs(admission)
        runs.submit("a1")
        runs.submit("a2")
        await settle()
        assert admission.expected_wait("a") == pytest.approx(admission.typical_run_seconds() / 2)
        await runs.done("a1")
        await runs.done("a2")

    scenario(body)


def test_a_bound_of_zero_refuses_rather_than_waits() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=0, max_waiting_per_user=10)
        runs = Runs(admission)
        runs.submit("a1")
        await settle()
        with pytest.raises(SandboxBusy) as refused:
            async with admission.slot("b"):
                raise AssertionError("admitted with no free slot")
        assert refused.value.retry_after == 1.0
        await runs.done("a1")
        async with admission.slot("b"):  # a free slot needs no wait
            assert admission.running == 1
        assert admission.running == 0

    scenario(body)


def test_a_user_may_have_only_so_many_runs_waiting() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=1000, max_waiting_per_user=2)
        runs = Runs(admission)
        for name in ("a0", "a1", "a2"):
            runs.submit(name)
        await settle()
        with pytest.raises(SandboxBusy) as refused:
            async with admission.slot("a"):
                raise AssertionError("admitted past the per-user count")
        assert refused.value.retry_after == 3.0  # behind a0, a1 and a2
        runs.submit("b1")  # another user's run still queues
        await settle()
        assert admission.waiting_of("b") == 1
        for name in ("a0", "a1", "b1", "a2"):
            await runs.done(name)
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_a_caller_that_goes_away_leaves_the_line() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        for name in ("a0", "a1", "b1", "a2"):
            runs.submit(name)
            await settle()
        assert admission.waiting == 3
        runs.tasks["b1"].cancel()
        await settle()
        assert runs.tasks["b1"].cancelled()
        assert (admission.waiting, admission.waiting_of("b")) == (2, 0)
        assert admission.expected_wait("c") == 2.0  # b1 no longer counts
        for name in ("a0", "a1", "a2"):
            await runs.done(name)
        assert runs.started == ["a0", "a1", "a2"]
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_a_slot_handed_to_a_caller_as_it_goes_away_passes_to_the_next() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        async with admission.slot("a"):
            for name in ("b1", "c1"):
                runs.submit(name)
                await settle()
        # The slot went to b1 as the block ended, but b1 has not resumed yet when its caller leaves.
        assert (admission.running_of("b"), admission.waiting) == (1, 1)
        runs.tasks["b1"].cancel()
        await settle()
        assert runs.tasks["b1"].cancelled()
        assert runs.started == ["c1"]
        assert (admission.running, admission.running_of("c"), admission.waiting) == (1, 1, 0)
        await runs.done("c1")
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_a_run_that_fails_or_is_cancelled_while_running_frees_its_slot() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=30, max_waiting_per_user=10)
        with pytest.raises(RuntimeError):
            async with admission.slot("a"):
                raise RuntimeError("the sandbox failed")
        assert admission.running == 0
        runs = Runs(admission)
        runs.submit("a1")
        runs.submit("b1")
        await settle()
        runs.tasks["a1"].cancel()
        await settle()
        assert runs.started == ["a1", "b1"]
        await runs.done("b1")
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_many_runs_cancelled_at_random_moments_never_exceed_the_slots_or_lose_one() -> None:
    async def body() -> None:
        rng = random.Random(10)
        admission = Admission(slots=3, per_user=2, max_wait_seconds=1e9, max_waiting_per_user=1000)
        at_once: dict[str, int] = {}
        peaks = {"total": 0}

        async def run(user: str) -> None:
            async with admission.slot(user):
                at_once[user] = at_once.get(user, 0) + 1
                assert at_once[user] <= 2
                peaks["total"] = max(peaks["total"], sum(at_once.values()))
                try:
                    await asyncio.sleep(rng.random() / 200)
                finally:
                    at_once[user] -= 1

        tasks = [asyncio.get_running_loop().create_task(run(rng.choice("abcd"))) for _ in range(400)]
        for _ in range(150):
            await asyncio.sleep(rng.random() / 500)
            rng.choice(tasks).cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
        assert sum(r is None for r in results) > 100
        assert peaks["total"] == 3
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)


def test_the_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(slots=0, per_user=1, max_wait_seconds=1, max_waiting_per_user=1)
    assert Admission(slots=2, per_user=5, max_wait_seconds=0, max_waiting_per_user=0).per_user == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_queue_seconds": -1}, "option max_queue_seconds: expected a positive number, got -1"),
        ({"runs_per_core": 0}, "option runs_per_core: expected a positive number, got 0"),
        ({"max_runs_per_user": 0}, "option max_runs_per_user: expected an integer of at least 1, got 0"),
        (
            {"max_waiting_per_user": -1},
            "option max_waiting_per_user: expected an integer of at least 0, got -1",
        ),
        ({"max_waiting": 3}, "unknown option 'max_waiting'"),
    ],
)
def test_backend_options_of_admission_are_validated(options: dict[str, object], message: str) -> None:
    with pytest.raises(BackendOptionError, match=message):
        backend_options("bwrap", options)


def test_backend_options_accept_a_bound_of_zero() -> None:
    options = backend_options("bwrap", {"max_queue_seconds": 0, "max_waiting_per_user": 0})
    assert (options.max_queue_seconds, options.max_waiting_per_user) == (0, 0)


# -- sizing -----------------------------------------------------------------------------------------


def fake_host(tmp_path: Path, cgroup_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:  8388608 kB\nMemAvailable:  4194304 kB\n")
    (proc / "self/cgroup").write_text(cgroup_lines)
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return proc, root


def test_memory_is_bounded_by_the_tightest_cgroup_on_the_way_up_v1(tmp_path: Path) -> None:
    proc, root = fake_host(
        tmp_path,
        "4:memory:/pods/executor\n1:cpu:/pods/executor\n",
        {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",  # no limit at the root
            "memory/memory.usage_in_bytes": "1000\n",
            "memory/pods/memory.limit_in_bytes": str(2048 * MiB),
            "memory/pods/memory.usage_in_bytes": str(1024 * MiB),
            "memory/pods/executor/memory.limit_in_bytes": str(3072 * MiB),
            "memory/pods/executor/memory.usage_in_bytes": str(512 * MiB),
            "cpu/pods/executor/cpu.cfs_quota_us": "150000\n",
            "cpu/pods/executor/cpu.cfs_period_us": "100000\n",
        },
    )
    assert available_memory_bytes(proc, root) == 1024 * MiB  # the parent's headroom, not the host's 4 GiB
    assert available_cores(proc, root) == min(1.5, len(os.sched_getaffinity(0)))


def test_memory_and_cores_in_a_container_of_cgroup_v2(tmp_path: Path) -> None:
    # In a container the mount shows only the container's own cgroup; the host's path is not under it.
    proc, root = fake_host(
        tmp_path,
        "0::/kubepods/pod1/abc\n",
        {"memory.max": str(512 * MiB), "memory.current": str(100 * MiB), "cpu.max": "50000 100000\n"},
    )
    assert available_memory_bytes(proc, root) == 412 * MiB
    assert available_cores(proc, root) == 0.5


def test_no_limit_leaves_the_hosts_memory(tmp_path: Path) -> None:
    proc, root = fake_host(
        tmp_path, "0::/\n", {"memory.max": "max\n", "memory.current": "5\n", "cpu.max": "max 100000"}
    )
    assert available_memory_bytes(proc, root) == 4 * 1024 * MiB


def test_the_slots_are_the_smaller_of_memory_and_cores() -> None:
    limits = Limits(memory_bytes=256 * MiB, cpus=1.0)
    capacity = host_capacity(limits, runs_per_core=4)
    # (MemAvailable moves a little between two readings.)
    assert abs(capacity.by_memory - available_memory_bytes() // (256 * MiB)) <= 1
    assert capacity.by_cores == int(available_cores() * 4)
    assert capacity.slots == max(1, min(capacity.by_memory, capacity.by_cores))
    # A run held to half a core lets twice as many share the cores; a run of 64 GiB fits far fewer.
    assert host_capacity(Limits(cpus=0.5), runs_per_core=4).by_cores == int(available_cores() * 8)
    huge = host_capacity(Limits(memory_bytes=1 << 50), runs_per_core=4)
    assert (huge.by_memory, huge.slots) == (0, 1)
    assert "runs at once: memory allows" in capacity.describe()


def test_a_waiter_cancelled_in_the_turn_a_slot_frees_does_not_take_it() -> None:
    async def body() -> None:
        admission = Admission(slots=1, per_user=1, max_wait_seconds=30, max_waiting_per_user=10)
        runs = Runs(admission)
        for name in ("a1", "b1", "c1"):
            runs.submit(name)
        await settle()
        assert runs.started == ["a1"]
        # b1's caller goes away and a1 ends in the same turn, before b1's task runs again.
        runs.finish["a1"].set()
        runs.tasks["b1"].cancel()
        await runs.tasks["a1"]
        await settle()
        assert runs.tasks["b1"].cancelled()
        assert runs.started == ["a1", "c1"]
        await runs.done("c1")
        assert (admission.running, admission.waiting) == (0, 0)

    scenario(body)
