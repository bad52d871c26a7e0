"""The secrets service's logic: a user's secrets, stored in Vault, each change recorded in the audit
log before it is acknowledged.

A change is made in Vault first and recorded second; if the record cannot be written, the change is
undone (a new secret removed, an update reverted, a delete reversed) and the caller gets 503, so
nothing acknowledged goes unlogged. A put or delete runs to its end as one unit of work even when
its request is cancelled (`run_to_completion`), so a client that hangs up between the Vault write
and the record cannot leave a change without its record or its undo. A value that is replaced or deleted is destroyed, not kept as an
old version. Only the user of the request in hand is ever acted for.

With markers (`UserMarkers`, shared with the executor), a user is marked before their first secret
is written and unmarked once their last is deleted, so that a run of a user without secrets needs
no call here, and listing their secrets no call to Vault; the markers are reconciled with Vault at
start-up (`keep_markers`). Each mark writes a new stamp: before a value is written, again before a
change is acknowledged and after an undo, so that the executor, which keeps a user's values while
their stamp stays the same, never runs code with a value older than the last acknowledged change."""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import hvac.exceptions

from services.platform.audit import CHANGE_KEPT_UNRECORDED, SUCCESS, AuditClient, run_to_completion
from services.platform.errors import DomainError, InvalidArgument, NotFound, Unavailable
from services.platform.identity import Identity
from services.platform.user_markers import KeptUnderStamp, UserMarkers, new_stamp
from services.secrets.rules import SecretLimits, check_description, check_name, check_value, is_allowed_name
from services.secrets.vault import CheckAndSetConflict, SecretRecord, VaultSecretStore

log = logging.getLogger("pythonon.secrets")

PUT, DELETE = "secrets.put", "secrets.delete"
_WRITE_ATTEMPTS = 3
T = TypeVar("T")
# About what a kept record holds besides its description (name, version, two times).
RECORD_BYTES = 256
CONFLICT_MESSAGE = "the secret was being changed by another request at the same time; retry"


def _resource(name: str) -> str:
    return f"secret/{name}"


async def _each(names: Iterable[str], read: Callable[[str], T]) -> builtins.list[T]:
    """`read(name)` (a blocking Vault call) for every name at once, each in a worker thread: a run
    of a user with five secrets waited for six calls in a row."""
    return await asyncio.gather(*(asyncio.to_thread(read, name) for name in names))


class UserSecrets:
    """Put, delete, list and resolve the secrets of one user at a time."""

    def __init__(
        self,
        store: VaultSecretStore,
        audit: AuditClient,
        limits: SecretLimits,
        markers: UserMarkers | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._limits = limits
        self._markers = markers
        # One change at a time per user in this process, so the per-user cap holds under concurrency.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Each user's listed secrets (metadata, never a value), while their stamp stays the same.
        self._kept_lists: KeptUnderStamp[tuple[SecretRecord, ...]] = KeptUnderStamp(
            lambda records: sum(RECORD_BYTES + len(record.description.encode()) for record in records)
        )

    async def put(self, user: Identity, name: str, value: str, description: str) -> SecretRecord:
        """Create the secret or store a new version of it; returns its metadata."""
        return await run_to_completion(self._put(user, name, value, description), action=PUT)

    async def delete(self, user: Identity, name: str) -> None:
        """Delete the secret and every version of it; NotFound when there is none."""
        await run_to_completion(self._delete(user, name), action=DELETE)

    async def _put(self, user: Identity, name: str, value: str, description: str) -> SecretRecord:
        check_name(name)
        check_value(value, self._limits)
        check_description(description)
        async with self._lock(user.user_id):
            for _attempt in range(_WRITE_ATTEMPTS):
                try:
                    return await self._put_once(user, name, value, description)
                except CheckAndSetConflict:
                    continue
        raise Unavailable(CONFLICT_MESSAGE)

    async def _put_once(self, user: Identity, name: str, value: str, description: str) -> SecretRecord:
        uid = user.user_id
        state = await asyncio.to_thread(self._store.state, uid, name)
        if state is not None and not state.live:
            # A tombstone of an unfinished delete: clear it so the secret starts afresh.
            await asyncio.to_thread(self._store.purge, uid, name)
            state = None
        if state is None:
            others = [n for n in await asyncio.to_thread(self._store.names, uid) if n != name]
            if len(others) >= self._limits.max_secrets_per_user:
                raise InvalidArgument(
                    f"you already have {len(others)} secrets, the most allowed; delete one to add another"
                )
        previous = state.current_version if state is not None else 0
        self._restamp(uid)  # before the value exists: a run never misses it
        written = await asyncio.to_thread(
            functools.partial(
                self._store.write,
                uid,
                name,
                value,
                description,
                cas=previous,
                created_at=state.created_at if state is not None else None,
            )
        )

        async def undo() -> None:
            try:
                if previous == 0:
                    await asyncio.to_thread(self._store.purge, uid, name)
                else:
                    await asyncio.to_thread(
                        self._store.revert, uid, name, to_version=previous, from_version=written.version
                    )
            finally:
                self._restamp(uid)  # a run meanwhile may have kept the value being undone

        await self._record(PUT, name, written.version, undo)
        # Again, with a new stamp: a delete elsewhere may have unmarked the user meanwhile, and a
        # run since the first stamp may have kept the old value. The change is made and recorded
        # by now, so a failure here is logged, not answered.
        try:
            self._restamp(uid)
        except OSError as error:
            log.warning("could not mark a user who has secrets", extra={"error": error.strerror})
        if previous:
            # A replaced value is not kept: rotating a leaked secret must get rid of it.
            try:
                await asyncio.to_thread(self._store.destroy, uid, name, previous)
            except Unavailable:
                log.warning("the replaced version could not be destroyed", extra={"secret": name})
        return SecretRecord(
            name=name,
            description=description,
            version=written.version,
            created_at=state.created_at if state is not None else written.created_at,
            updated_at=written.created_at,
        )

    async def _delete(self, user: Identity, name: str) -> None:
        check_name(name)
        uid = user.user_id
        async with self._lock(uid):
            state = await asyncio.to_thread(self._store.state, uid, name)
            if state is None or not state.live:
                raise NotFound(f"no secret named {name}")
            # Reversibly first, so that a failed audit record can put it back.
            await asyncio.to_thread(self._store.soft_delete, uid, name)

            async def undo() -> None:
                try:
                    await asyncio.to_thread(self._store.undelete, uid, name, state.current_version)
                finally:
                    self._restamp(uid)

            await self._record(DELETE, name, state.current_version, undo)
            try:
                await asyncio.to_thread(self._store.purge, uid, name)
            except Unavailable:
                # Deleted and recorded already; the tombstone left is cleared by the next put.
                log.warning("secret deleted but its old versions not purged", extra={"secret": name})
            if self._markers is not None:
                await asyncio.to_thread(self._unmark_if_none_left, uid)

    def _unmark_if_none_left(self, uid: str) -> None:
        """Unmark a user whose last entry is gone; then look again, and mark them back if a put
        (of another replica) wrote in between. The delete is made and recorded by now: when Vault
        cannot say, the user stays marked (a marker too many costs a call, nothing else)."""
        assert self._markers is not None
        try:
            if self._store.names(uid):
                self._restamp(uid)  # secrets left: a reader that kept them asks again
                return
            self._markers.unmark(uid)
            if self._store.names(uid):
                self._restamp(uid)
        except (Unavailable, hvac.exceptions.VaultError, OSError):
            self._restamp(uid)
            log.warning("could not tell whether a user has secrets left; kept marked")

    async def keep_markers(self, retry_seconds: float = 2.0) -> None:
        """Reconcile the markers with Vault (until Vault answers); readers ask meanwhile, since
        the caller made them incomplete before serving."""
        if self._markers is None:
            return
        while True:
            try:
                users = await asyncio.to_thread(self._store.users)
            except Unavailable:
                await asyncio.sleep(retry_seconds)
                continue
            # A put since the listing marked its user, whom reconciling may unmark: one more
            # listing restores them before readers trust the markers.
            self._markers.reconcile({uid: new_stamp() for uid in users})
            for uid in await asyncio.to_thread(self._store.users):
                self._restamp(uid)
            self._markers.complete()
            log.info("secret markers reconciled with vault", extra={"count": len(users)})
            return

    async def list(self, user: Identity) -> list[SecretRecord]:
        """Metadata of every secret of the user, sorted by name; kept, like the executor keeps
        values, while the user's marker holds the stamp it was read under."""
        uid = user.user_id
        stamp = self._markers.stamp(uid) if self._markers is not None else None
        kept = self._kept_lists.get(uid, stamp) if stamp else None
        if kept is not None:
            return list(kept)
        names = await self._all_names(uid)
        records = await _each(names, lambda name: self._store.describe(uid, name))
        listed = sorted((record for record in records if record is not None), key=lambda record: record.name)
        if stamp:
            self._kept_lists.keep(uid, stamp, tuple(listed))
        return listed

    async def resolve(self, user: Identity, names: Iterable[str], everything: bool) -> dict[str, str]:
        """Values of the user's named secrets (or all of them); NotFound names the first missing one."""
        uid = user.user_id
        if everything:
            wanted = await self._all_names(uid)
        else:
            wanted = list(dict.fromkeys(check_name(name) for name in names))
        values = await _each(wanted, lambda name: self._store.value(uid, name))
        for name, value in zip(wanted, values, strict=True):
            if value is None and not everything:
                raise NotFound(f"no secret named {name}")
        # All of them: one deleted since the listing is simply not there.
        return {name: value for name, value in zip(wanted, values, strict=True) if value is not None}

    # -- internals ---------------------------------------------------------------------------------

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[user_id] = lock
        return lock

    async def _record(
        self, action: str, name: str, version: int, undo: Callable[[], Awaitable[None]]
    ) -> None:
        """Record the change on the user's chain; if that fails, undo the change and fail the request
        (503, not carried out). If the undo fails too, the 503 says the change was kept."""
        try:
            await self._audit.record(action, _resource(name), SUCCESS, {"version": version})
        except Unavailable:
            try:
                await undo()
            except (DomainError, CheckAndSetConflict, hvac.exceptions.VaultError):
                log.error(
                    "a change the audit log refused could not be undone",
                    extra={"action": action, "secret": name, "version": version},
                )
                raise Unavailable(CHANGE_KEPT_UNRECORDED) from None
            raise

    def _restamp(self, uid: str) -> None:
        """Mark the user with a new stamp, so that a reader that kept their values asks again. If
        the marker cannot be written, readers are told to trust no marker (they ask every time
        until the next start reconciles them): a missing mark or an unchanged stamp could
        otherwise hide a change. OSError only when even that fails."""
        if self._markers is None:
            return
        try:
            self._markers.mark(uid, new_stamp())
        except OSError as error:
            log.error(
                "could not stamp a user's secrets marker; markers are not trusted until a restart",
                extra={"error": error.strerror},
            )
            self._markers.incomplete()

    async def _all_names(self, uid: str) -> builtins.list[str]:
        """The names of the user's secrets; none, without asking Vault, for a user whom complete
        markers show to have none (the same judgement the executor makes before each run)."""
        if self._markers is not None and not self._markers.may_have(uid):
            return []
        return await asyncio.to_thread(self._names, uid)

    def _names(self, uid: str) -> builtins.list[str]:
        # Entries put in Vault by other means, under names this API refuses, are not secrets here.
        return [name for name in self._store.names(uid) if is_allowed_name(name)]
