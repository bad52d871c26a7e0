"""The audit service's repository: entries and chain heads, nothing about requests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime
from typing import cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.audit.chain import GENESIS_HASH, ChainedEntry, ChainHeadView
from services.audit.models import ChainHead, Entry

# Entries read per query when walking a whole chain.
CHAIN_BATCH = 500
# Declarative classes type __table__ as a FromClause; these are the Tables themselves.
_ENTRIES = cast(sa.Table, Entry.__table__)
_HEADS = cast(sa.Table, ChainHead.__table__)
# The columns an entry's view holds (all but user_id and record_id).
_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(ChainedEntry))


class AuditRepository:
    """Operations on one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def lock_head(self, user_id: str, now: datetime) -> ChainHeadView:
        """The user's chain head, created if absent and locked until the transaction ends.

        Holding it serializes appends to one chain: PostgreSQL locks the row (SELECT ... FOR
        UPDATE); on SQLite the insert-if-absent, a write, takes the database's one write lock.
        Core statements on the session's connection: an append is on every request's path, and the
        ORM's unit of work costs more than the statements themselves."""
        connection = self._session.connection()
        insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
        connection.execute(
            insert(_HEADS)
            .values(user_id=user_id, last_sequence=0, last_hash=GENESIS_HASH, updated_at=now)
            .on_conflict_do_nothing(index_elements=["user_id"])
        )
        row = connection.execute(
            sa.select(_HEADS.c.last_sequence, _HEADS.c.last_hash)
            .where(_HEADS.c.user_id == user_id)
            .with_for_update()
        ).one_or_none()
        if row is None:  # pragma: no cover - inserted just above, in this transaction
            raise RuntimeError("chain head vanished inside its transaction")
        return ChainHeadView(last_sequence=row.last_sequence, last_hash=row.last_hash)

    def head(self, user_id: str) -> ChainHead | None:
        return self._session.scalar(
            sa.select(ChainHead).where(ChainHead.user_id == user_id).execution_options(populate_existing=True)
        )

    def entry_by_record_id(self, user_id: str, record_id: str) -> ChainedEntry | None:
        row = (
            self._session.connection()
            .execute(
                sa.select(*(_ENTRIES.c[name] for name in _ENTRY_FIELDS)).where(
                    _ENTRIES.c.user_id == user_id, _ENTRIES.c.record_id == record_id
                )
            )
            .one_or_none()
        )
        return None if row is None else ChainedEntry(**row._asdict())

    def append(self, user_id: str, record_id: str, entry: ChainedEntry) -> None:
        """Add `entry` (the successor of the user's locked head) and move the head onto it."""
        connection = self._session.connection()
        connection.execute(
            sa.insert(_ENTRIES).values(
                user_id=user_id,
                record_id=record_id,
                **{name: getattr(entry, name) for name in _ENTRY_FIELDS},
            )
        )
        connection.execute(
            sa.update(_HEADS)
            .where(_HEADS.c.user_id == user_id)
            .values(last_sequence=entry.sequence, last_hash=entry.hash, updated_at=entry.timestamp)
        )

    def page(
        self,
        user_id: str,
        limit: int,
        *,
        before_sequence: int | None = None,
        action: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Entry]:
        """Up to `limit` of the user's entries, newest (highest sequence) first."""
        query = sa.select(Entry).where(Entry.user_id == user_id)
        if before_sequence is not None:
            query = query.where(Entry.sequence < before_sequence)
        if action:
            query = query.where(Entry.action == action)
        if since is not None:
            query = query.where(Entry.timestamp >= since)
        if until is not None:
            query = query.where(Entry.timestamp < until)
        return list(self._session.scalars(query.order_by(Entry.sequence.desc()).limit(limit)))

    def chain(self, user_id: str, up_to_sequence: int) -> Iterator[Entry]:
        """The user's entries with sequence up to `up_to_sequence`, oldest first, read in batches."""
        batch = CHAIN_BATCH
        after = 0
        while True:
            rows = list(
                self._session.scalars(
                    sa.select(Entry)
                    .where(
                        Entry.user_id == user_id,
                        Entry.sequence > after,
                        Entry.sequence <= up_to_sequence,
                    )
                    .order_by(Entry.sequence)
                    .limit(batch)
                )
            )
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].sequence

    def highest_sequence_after(self, user_id: str, sequence: int) -> int | None:
        """The highest sequence above `sequence`, if any entry lies beyond it."""
        return self._session.scalar(
            sa.select(sa.func.max(Entry.sequence)).where(Entry.user_id == user_id, Entry.sequence > sequence)
        )
