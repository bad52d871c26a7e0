"""The audit service's repository: entries and chain heads, nothing about requests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.audit.chain import GENESIS_HASH
from services.audit.models import ChainHead, Entry

# Entries read per query when walking a whole chain.
CHAIN_BATCH = 500


class AuditRepository:
    """Operations on one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def lock_head(self, user_id: str, now: datetime) -> ChainHead:
        """The user's chain head, created if absent and locked until the transaction ends.

        Holding it serializes appends to one chain: PostgreSQL locks the row (SELECT ... FOR
        UPDATE); on SQLite the insert-if-absent, a write, takes the database's one write lock."""
        dialect = self._session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._session.execute(
            insert(ChainHead)
            .values(user_id=user_id, last_sequence=0, last_hash=GENESIS_HASH, updated_at=now)
            .on_conflict_do_nothing(index_elements=["user_id"])
        )
        head = self._session.scalar(
            sa.select(ChainHead)
            .where(ChainHead.user_id == user_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        if head is None:  # pragma: no cover - inserted just above, in this transaction
            raise RuntimeError("chain head vanished inside its transaction")
        return head

    def head(self, user_id: str) -> ChainHead | None:
        return self._session.scalar(
            sa.select(ChainHead).where(ChainHead.user_id == user_id).execution_options(populate_existing=True)
        )

    def entry_by_record_id(self, user_id: str, record_id: str) -> Entry | None:
        return self._session.scalar(
            sa.select(Entry).where(Entry.user_id == user_id, Entry.record_id == record_id)
        )

    def append(self, head: ChainHead, entry: Entry) -> None:
        """Add `entry` (the successor of `head`) and move the head onto it."""
        self._session.add(entry)
        head.last_sequence = entry.sequence
        head.last_hash = entry.hash
        head.updated_at = entry.timestamp
        self._session.flush()

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
