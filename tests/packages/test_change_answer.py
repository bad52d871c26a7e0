"""What a package change answers, and that its build starts whatever that answer's read does.

The answer is the list read before the build starts (a new set is `pending` in it, not `pending`
or `building` as the build task's timing decides: CI once failed on exactly that race), and the
build starts even when that read fails, since the change is made and recorded by then. The
service's parts are stand-ins here, recording the order of the calls; the lifecycle through Envoy is
tests/integration/test_packages_api.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from services.packages.requirements import PackageSpec
from services.packages.storage import BUILDING, PENDING, BuildState, UserState
from services.packages.user_packages import UserPackages
from services.platform.identity import Identity

USER = Identity("00000000-0000-0000-0000-000000000001", "someone@example.com")
SPEC = PackageSpec(name="tiny-greet", spec="tiny-greet>=1.1")


class ReadFailed(Exception):
    pass


class Database:
    """Answers the change's three transactions in order: the list before, the new build, the list
    after (which reads the build's status at that moment, as the real query does)."""

    def __init__(self, events: list[str], builds: Builds, fail_last_read: bool) -> None:
        self._events, self._builds, self._fail = events, builds, fail_last_read
        self._calls = 0

    async def run(self, _work: Callable[[Any], Any]) -> Any:
        self._calls += 1
        await asyncio.sleep(0)  # a thread hop in the real one: other tasks may run
        if self._calls == 1:
            return UserState(packages=[], build=None)
        if self._calls == 2:
            return self._builds.state
        self._events.append("read the answer")
        if self._fail:
            raise ReadFailed
        return UserState(packages=[SPEC], build=self._builds.state)


class Builds:
    def __init__(self, events: list[str]) -> None:
        self._events = events
        self.state = BuildState(set_key="k", requirements=[SPEC.spec], status=PENDING)

    def start(self, build: BuildState) -> None:
        self._events.append("start the build")
        self.state = BuildState(set_key=build.set_key, requirements=build.requirements, status=BUILDING)

    def collect_soon(self) -> None:
        self._events.append("collect")


class Store:
    def mark(self, _user_id: str, _set_key: str | None) -> None:
        pass


class Audit:
    def __init__(self, events: list[str]) -> None:
        self._events = events

    async def record(self, action: str, *_args: Any) -> None:
        self._events.append(f"record {action}")


def _packages(fail_last_read: bool) -> tuple[UserPackages, list[str]]:
    events: list[str] = []
    builds = Builds(events)
    db = Database(events, builds, fail_last_read)
    return UserPackages(db, Store(), builds, Audit(events), "target"), events  # type: ignore[arg-type]


def test_a_new_set_answers_pending_read_before_its_build_starts() -> None:
    packages, events = _packages(fail_last_read=False)
    [view] = asyncio.run(packages.set_packages(USER, ["tiny-greet>=1.1"]))
    assert (view.name, view.status) == ("tiny-greet", PENDING)
    assert events == ["record packages.set", "read the answer", "start the build", "collect"]


def test_the_build_starts_when_the_answers_read_fails() -> None:
    packages, events = _packages(fail_last_read=True)
    with pytest.raises(ReadFailed):
        asyncio.run(packages.set_packages(USER, ["tiny-greet>=1.1"]))
    assert events == ["record packages.set", "read the answer", "start the build", "collect"]
