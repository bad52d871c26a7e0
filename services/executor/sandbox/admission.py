"""Fair admission of runs: how many run at once (sized by the host's memory and cores), and who goes
next when all are taken.

A run that finds no free slot waits in line instead of being refused, as long as its expected wait
stays within a bound; past the bound, or past a per-user count of waiting runs (which bounds the
memory held by queued requests), it is refused at once with SandboxBusy carrying that expected
wait as its retry delay. Waiting runs are served round-robin across users, and no user has more
than `per_user` runs at once while others want slots, so a user who floods the queue delays
another user's single run by about one run's time, not by the flood. Slots nobody else wants are
lent beyond the cap, except the last one, which stays free so that a newcomer starts at once: one
user alone may use all slots but one (a lone client at concurrency 8 is not held to half the host). A waiter whose caller goes away (its task is cancelled)
leaves the line, and a slot handed to it at that moment goes on to the next.

The number of slots, when not configured: min(memory, cores), where
- memory = the memory available to the service / the memory limit of a run, so that every run at
  once may use its whole limit: MemAvailable, bounded by the headroom of the service's own cgroup
  (and its ancestors') where it has a limit (a container's or a pod's);
- cores = the cores available to the service × `runs_per_core` / the CPU quota of a run
  (Limits.cpus): the cgroup quota keeps a run within `cpus` cores, and most runs spend most of their
  time sleeping or waiting on I/O, which uses no core, so a core is shared by several."""

from __future__ import annotations

import asyncio
import collections
import math
import os
import statistics
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from services.executor.sandbox.interface import Limits, SandboxBusy

# What a run is taken to last before any has finished (then: the median of the recent ones).
INITIAL_RUN_SECONDS = 1.0
RECENT_RUNS = 32


class Admission:
    def __init__(
        self,
        slots: int,
        per_user: int,
        max_wait_seconds: float,
        max_waiting_per_user: int,
    ) -> None:
        if slots < 1 or per_user < 1 or max_wait_seconds < 0 or max_waiting_per_user < 0:
            raise ValueError(
                "slots and per_user must be at least 1, max_wait_seconds and max_waiting_per_user "
                "not negative"
            )
        self.slots = slots
        self.per_user = min(per_user, slots)
        self.max_wait_seconds = max_wait_seconds
        self.max_waiting_per_user = max_waiting_per_user
        self._running: collections.Counter[Hashable] = collections.Counter()
        self._running_total = 0
        # Users with waiting runs, in round-robin order: the next slot goes to the first one below
        # its per-user cap, who then moves to the back.
        self._queues: dict[Hashable, collections.deque[asyncio.Future[None]]] = {}
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=RECENT_RUNS)

    @property
    def running(self) -> int:
        return self._running_total

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def running_of(self, user: Hashable) -> int:
        return self._running[user]

    def waiting_of(self, user: Hashable) -> int:
        return len(self._queues.get(user, ()))

    def typical_run_seconds(self) -> float:
        return statistics.median(self._recent_seconds) if self._recent_seconds else INITIAL_RUN_SECONDS

    def expected_wait(self, user: Hashable) -> float:
        """Seconds a new run of `user` would wait for its slot, at the recent pace of runs: the
        longer of waiting for enough of the user's own runs to finish (its cap) and for enough runs
        to finish that every run served before it in the round-robin has a slot."""
        own_waiting = self.waiting_of(user)
        own_needed = own_waiting + 1 - (self.per_user - self._running[user])
        ahead = own_waiting + sum(
            min(len(queue), own_waiting + 1) for other, queue in self._queues.items() if other != user
        )
        needed = ahead + 1 - (self.slots - self._running_total)
        rounds = max(0.0, own_needed / self.per_user, needed / self.slots)
        return rounds * self.typical_run_seconds()

    @asynccontextmanager
    async def slot(self, user: Hashable = "") -> AsyncIterator[None]:
        """Hold one run slot for `user` (any hashable key; runs of equal keys share a user's cap and
        turn) for the body of the block; SandboxBusy when the wait would be too long."""
        queue = self._queues.get(user)
        if queue is None and self._may_start(user):
            # Free slots are handed out as soon as they free up, so any run still waiting now is
            # held back by its own user's cap: this one overtakes no one.
            self._take(user)
        else:
            expected = self.expected_wait(user)
            if expected > self.max_wait_seconds or self.waiting_of(user) >= self.max_waiting_per_user:
                raise SandboxBusy(
                    max(1.0, math.ceil(expected)),
                    f"the expected wait for a run slot is {expected:.1f} s (bound "
                    f"{self.max_wait_seconds:g} s) with {self.waiting_of(user)} of this user's runs "
                    "already waiting",
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queues.setdefault(user, collections.deque()).append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release(user)  # the slot came as the caller left: it goes to the next
                else:
                    self._leave_queue(user, waiter)
                raise
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield
        except asyncio.CancelledError:
            raise  # a run cut short says nothing of how long runs take
        except BaseException:
            self._recent_seconds.append(loop.time() - started)
            raise
        else:
            self._recent_seconds.append(loop.time() - started)
        finally:
            self._release(user)

    def _may_start(self, user: Hashable) -> bool:
        """Whether a run of `user` may take a free slot now: within its cap, or beyond it on a slot
        that no run below its cap is waiting for, as long as one slot stays free for a newcomer."""
        if self._running_total >= self.slots:
            return False
        if self._running[user] < self.per_user:
            return True
        return self._running_total < self.slots - 1 and not any(
            self._running[other] < self.per_user for other in self._queues if other != user
        )

    def _take(self, user: Hashable) -> None:
        self._running[user] += 1
        self._running_total += 1

    def _release(self, user: Hashable) -> None:
        self._running[user] -= 1
        if self._running[user] <= 0:
            del self._running[user]
        self._running_total -= 1
        self._hand_out()

    def _leave_queue(self, user: Hashable, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(user)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._queues[user]

    def _hand_out(self) -> None:
        """Give free slots to waiting runs, round-robin over the users below their cap, then (lent
        slots) over the others."""
        while self._running_total < self.slots:
            user = next((u for u in self._queues if self._running[u] < self.per_user), None)
            if user is None:
                user = next((u for u in self._queues if self._may_start(u)), None)
            if user is None:
                return
            queue = self._queues.pop(user)
            waiter = queue.popleft()
            if queue:
                self._queues[user] = queue  # back of the line for this user's next run
            if waiter.done():
                # Cancelled in this same turn of the loop, before its task could leave the line.
                continue
            self._take(user)
            waiter.set_result(None)


@dataclass(frozen=True)
class Capacity:
    """How many runs fit at once on this host, and why."""

    by_memory: int
    by_cores: int
    memory_bytes: int
    cores: float

    @property
    def slots(self) -> int:
        return max(1, min(self.by_memory, self.by_cores))

    def describe(self) -> str:
        return (
            f"{self.slots} runs at once: memory allows {self.by_memory} "
            f"({self.memory_bytes // (1024 * 1024)} MiB available), cores {self.by_cores} "
            f"({self.cores:g} available)"
        )


def host_capacity(limits: Limits, runs_per_core: float, sharers: int = 1) -> Capacity:
    """min(available memory / a run's memory limit, available cores × runs_per_core / a run's CPU
    quota): see the module's docstring. `sharers`: executors sizing themselves on this host, each
    for its share of the memory and the cores."""
    memory = available_memory_bytes() // sharers
    cores = available_cores() / sharers
    return Capacity(
        by_memory=memory // limits.memory_bytes,
        by_cores=math.floor(cores * runs_per_core / limits.cpus),
        memory_bytes=memory,
        cores=cores,
    )


def available_memory_bytes(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """MemAvailable, bounded by the headroom (limit minus usage) of the service's cgroup and each of
    its ancestors that has a memory limit."""
    available = _meminfo_available(proc)
    membership = _own_cgroups(proc)
    v2 = membership.get("")
    if v2 is not None:
        for directory in _cgroup_and_ancestors(cgroup_root, v2):
            limit = _read_number(directory / "memory.max")
            usage = _read_number(directory / "memory.current")
            if limit is not None and usage is not None:
                available = min(available, max(0, limit - usage))
    v1 = membership.get("memory")
    if v1 is not None:
        for directory in _cgroup_and_ancestors(cgroup_root / "memory", v1):
            limit = _read_number(directory / "memory.limit_in_bytes")
            usage = _read_number(directory / "memory.usage_in_bytes")
            if limit is not None and usage is not None and limit < 1 << 62:  # else: no limit
                available = min(available, max(0, limit - usage))
    return available


def available_cores(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> float:
    """The CPUs this process may run on, bounded by the CPU quota of its cgroup and its ancestors."""
    cores = float(len(os.sched_getaffinity(0)))
    membership = _own_cgroups(proc)
    v2 = membership.get("")
    if v2 is not None:
        for directory in _cgroup_and_ancestors(cgroup_root, v2):
            try:
                quota, period = (directory / "cpu.max").read_text().split()
            except (OSError, ValueError):
                continue
            if quota != "max" and int(period) > 0:
                cores = min(cores, int(quota) / int(period))
    v1 = membership.get("cpu")
    if v1 is not None:
        for directory in _cgroup_and_ancestors(cgroup_root / "cpu", v1):
            quota_v1 = _read_number(directory / "cpu.cfs_quota_us")
            period_v1 = _read_number(directory / "cpu.cfs_period_us")
            if quota_v1 is not None and period_v1 and quota_v1 > 0:
                cores = min(cores, quota_v1 / period_v1)
    return max(cores, 0.01)


def _meminfo_available(proc: Path) -> int:
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _own_cgroups(proc: Path) -> dict[str, str]:
    """controller -> this process's cgroup path; the v2 path under the key ""."""
    membership: dict[str, str] = {}
    try:
        text = (proc / "self/cgroup").read_text()
    except OSError:
        return membership
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                membership[controller] = parts[2]
    return membership


def _cgroup_and_ancestors(mount: Path, path: str) -> list[Path]:
    """The directories of a cgroup and its ancestors under `mount`. In a container the mount shows
    only the container's own cgroup, whose path (seen from the host) is not under it: then the
    mount's root is the cgroup."""
    own = mount / path.lstrip("/")
    if not own.is_dir():
        return [mount] if mount.is_dir() else []
    found = []
    directory = own
    while True:
        found.append(directory)
        if directory == mount:
            return found
        directory = directory.parent


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None
