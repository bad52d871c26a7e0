"""The packages service's logic: a user's requirement list, each change audited before it is
acknowledged, and the state of the environment it builds. Knows nothing of gRPC.

A change is made in the database first and recorded second; if the record cannot be written the
change is undone and the caller gets 503, so nothing acknowledged goes unlogged. The pair runs to
its end even when the request is cancelled (`run_to_completion`). Only the user of the request in
hand is ever acted for."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.packages import storage
from services.packages.builds import Builds
from services.packages.environments import EnvironmentStore
from services.packages.requirements import MAX_PACKAGES, PackageSpec, check_name, parse, parse_list, set_key
from services.packages.storage import PENDING, READY, UserState
from services.platform.audit import CHANGE_KEPT_UNRECORDED, SUCCESS, AuditClient, run_to_completion
from services.platform.db import Database
from services.platform.errors import InvalidArgument, NotFound, Unavailable
from services.platform.identity import Identity

log = logging.getLogger("pythonon.packages")

SET, ADD, REMOVE = "packages.set", "packages.add", "packages.remove"
NONE = "none"


@dataclass(frozen=True)
class PackageView:
    name: str
    spec: str
    version: str
    status: str
    reason: str


@dataclass(frozen=True)
class EnvironmentView:
    status: str
    environment_key: str = ""
    path: str = ""
    ready: int = 0
    total: int = 0
    reason: str = ""


class UserPackages:
    def __init__(
        self, db: Database, store: EnvironmentStore, builds: Builds, audit: AuditClient, target_key: str
    ) -> None:
        self._db = db
        self._store = store
        self._builds = builds
        self._audit = audit
        # What a set is built for (interpreter, platform, index): part of every set's key.
        self._target_key = target_key
        # One change at a time per user in this process, so that a list is never read stale.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def list_packages(self, user: Identity) -> list[PackageView]:
        state = await self._db.run(lambda session: storage.user_state(session, user.user_id))
        return _views(state)

    async def set_packages(self, user: Identity, entries: Sequence[str]) -> list[PackageView]:
        """Replace the list (an empty one removes every package)."""
        specs = parse_list(entries)
        details = {"packages": [spec.spec for spec in specs]}
        return await run_to_completion(
            self._change(user, lambda _before: specs, SET, "packages", details), action=SET
        )

    async def add_package(self, user: Identity, entry: str) -> list[PackageView]:
        """Add one requirement; one of the same name already listed is replaced."""
        spec = parse(entry)

        def added(before: list[PackageSpec]) -> list[PackageSpec]:
            if any(existing.name == spec.name for existing in before):
                return [spec if existing.name == spec.name else existing for existing in before]
            if len(before) >= MAX_PACKAGES:
                raise InvalidArgument(f"package {entry.strip()!r}: you already have {MAX_PACKAGES} packages")
            return [*before, spec]

        return await run_to_completion(
            self._change(user, added, ADD, f"package/{spec.name}", {"package": spec.spec}), action=ADD
        )

    async def remove_package(self, user: Identity, name: str) -> list[PackageView]:
        canonical = check_name(name)

        def removed(before: list[PackageSpec]) -> list[PackageSpec]:
            if not any(existing.name == canonical for existing in before):
                raise NotFound(f"package {canonical!r} is not in your list")
            return [existing for existing in before if existing.name != canonical]

        return await run_to_completion(
            self._change(user, removed, REMOVE, f"package/{canonical}", {"name": canonical}), action=REMOVE
        )

    async def environment(self, user: Identity, wait_seconds: float) -> EnvironmentView:
        """The user's environment; waits up to `wait_seconds` while it is pending or building."""
        state = await self._db.run(lambda session: storage.user_state(session, user.user_id))
        if state.build is not None and state.build.status not in (READY, storage.FAILED) and wait_seconds > 0:
            await self._builds.wait(state.build.set_key, wait_seconds)
            state = await self._db.run(lambda session: storage.user_state(session, user.user_id))
        build = state.build
        if build is None:
            return EnvironmentView(status=NONE)
        progress = self._builds.progress(build)
        return EnvironmentView(
            status=build.status,
            environment_key=build.environment_key,
            path=str(self._store.path(build.environment_key)) if build.status == READY else "",
            ready=progress.ready,
            total=progress.total,
            reason=build.reason,
        )

    async def _change(
        self,
        user: Identity,
        change: Callable[[list[PackageSpec]], list[PackageSpec]],
        action: str,
        resource: str,
        details: dict[str, Any],
    ) -> list[PackageView]:
        uid = user.user_id
        async with self._lock(uid):
            before = await self._db.run(lambda session: storage.user_state(session, uid))
            after = change(before.packages)
            build = await self._apply(uid, after)
            try:
                await self._audit.record(action, resource, SUCCESS, details)
            except Unavailable:
                try:
                    restored = await self._apply(uid, before.packages)
                except Exception:  # noqa: BLE001 - whatever it was, the caller must hear the change stayed
                    log.exception("undoing a package change whose record failed also failed")
                    raise Unavailable(CHANGE_KEPT_UNRECORDED) from None
                if restored is not None and restored.status == PENDING:
                    self._builds.start(restored)  # a failed build the undo made pending again
                raise
            # The answer is the list as changed, read before its build starts: a new set is
            # `pending` in it, never `pending` or `building` as a race between two tasks decides.
            # The build starts even if that read fails: the change is made and recorded.
            try:
                state = await self._db.run(lambda session: storage.user_state(session, uid))
            finally:
                if build is not None and build.status == PENDING:
                    self._builds.start(build)
                self._builds.collect_soon()
        return _views(state)

    async def _apply(self, uid: str, packages: list[PackageSpec]) -> storage.BuildState | None:
        key = set_key(packages, self._target_key) if packages else None
        build = await self._db.run(lambda session: storage.replace_list(session, uid, packages, key))
        # Before the answer: the executor's next run of this user sees the change.
        await asyncio.to_thread(self._store.mark, uid, key)
        return build

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[user_id] = lock
        return lock


def _views(state: UserState) -> list[PackageView]:
    build = state.build
    views = []
    for spec in state.packages:
        status = build.status if build is not None else PENDING
        views.append(
            PackageView(
                name=spec.name,
                spec=spec.spec,
                version=build.versions.get(spec.name, "") if build is not None and status == READY else "",
                status=status,
                reason=build.reason if build is not None and status == storage.FAILED else "",
            )
        )
    return views
