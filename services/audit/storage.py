"""The audit service's repository: entries and chain heads, nothing about requests."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from services.audit.chain import GENESIS_HASH, ChainedEntry, ChainHeadView
from services.audit.models import ChainHead, Entry

# Entries read per query when walking a whole chain.
CHAIN_BATCH = 500
# Declarative classes type __table__ as a FromClause; these are the Tables themselves.
_ENTRIES = cast(sa.Table, Entry.__table__)
_HEADS = cast(sa.Table, ChainHead.__table__)
# The columns an entry's view holds (all but user_id and record_id).
_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(ChainedEntry))
_INSERTED = ("user_id", "record_id", *_ENTRY_FIELDS)


class _DriverStatement:
    """A Core statement compiled once for a dialect, run with `exec_driver_sql`: its SQL and
    parameter style are the driver's, its values converted as SQLAlchemy converts each column's (a
    timestamp in UTC, details as JSON). An append is on every request's path, and executing a
    Core statement cost SQLAlchemy more than the statement itself: a whole append took 1.7 ms so
    and 0.7 ms this way (SQLite, this machine)."""

    def __init__(
        self, statement: sa.ClauseElement, dialect: sa.engine.Dialect, columns: dict[str, sa.Column[Any]]
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = str(compiled)
        # qmark (SQLite) takes the values in order; pyformat (psycopg) by name.
        self._order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        self._convert: dict[str, Callable[[Any], Any]] = {}
        for name, column in columns.items():
            process = column.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._convert[name] = process

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        converted = {
            name: self._convert[name](value) if name in self._convert else value
            for name, value in values.items()
        }
        return converted if self._order is None else tuple(converted[name] for name in self._order)


@dataclasses.dataclass(frozen=True)
class _AppendStatements:
    """The statements of an append, for one dialect (compiled on first use)."""

    create_head: _DriverStatement
    lock_head: _DriverStatement
    recorded: _DriverStatement
    insert_entry: _DriverStatement
    move_head: _DriverStatement

    @staticmethod
    @functools.cache
    def of(dialect: sa.engine.Dialect) -> _AppendStatements:
        insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        head = _HEADS.c
        return _AppendStatements(
            create_head=_DriverStatement(
                insert(_HEADS)
                .values(
                    {
                        name: sa.bindparam(name)
                        for name in ("user_id", "last_sequence", "last_hash", "updated_at")
                    }
                )
                .on_conflict_do_nothing(index_elements=["user_id"]),
                dialect,
                {"updated_at": head.updated_at},
            ),
            # PostgreSQL locks the row; SQLite has no FOR UPDATE (the insert above took its lock).
            lock_head=_DriverStatement(
                sa.select(head.last_sequence, head.last_hash)
                .where(head.user_id == sa.bindparam("user_id"))
                .with_for_update(),
                dialect,
                {},
            ),
            recorded=_DriverStatement(
                sa.select(_ENTRIES.c.id).where(
                    _ENTRIES.c.user_id == sa.bindparam("user_id"),
                    _ENTRIES.c.record_id == sa.bindparam("record_id"),
                ),
                dialect,
                {},
            ),
            insert_entry=_DriverStatement(
                sa.insert(_ENTRIES).values({name: sa.bindparam(name) for name in _INSERTED}),
                dialect,
                {name: _ENTRIES.c[name] for name in _INSERTED},
            ),
            move_head=_DriverStatement(
                sa.update(_HEADS)
                .where(head.user_id == sa.bindparam("head"))
                .values({name: sa.bindparam(name) for name in ("last_sequence", "last_hash", "updated_at")}),
                dialect,
                {"updated_at": head.updated_at},
            ),
        )


class AuditRepository:
    """Operations on one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def lock_head(self, user_id: str, now: datetime) -> ChainHeadView:
        """The user's chain head, created if absent and locked until the transaction ends.

        Holding it serializes appends to one chain: PostgreSQL locks the row (SELECT ... FOR
        UPDATE); on SQLite the insert-if-absent, a write, takes the database's one write lock.
        Statements compiled once and run as the driver's (_DriverStatement), on the session's
        connection."""
        connection = self._session.connection()
        sql = _AppendStatements.of(connection.dialect)
        created = {"user_id": user_id, "last_sequence": 0, "last_hash": GENESIS_HASH, "updated_at": now}
        connection.exec_driver_sql(sql.create_head.sql, sql.create_head.parameters(created))
        locked = sql.lock_head.parameters({"user_id": user_id})
        row = connection.exec_driver_sql(sql.lock_head.sql, locked).one_or_none()
        if row is None:  # pragma: no cover - inserted just above, in this transaction
            raise RuntimeError("chain head vanished inside its transaction")
        return ChainHeadView(last_sequence=row[0], last_hash=row[1])

    def recorded(self, user_id: str, record_id: str) -> bool:
        """Whether the user's chain holds an entry of `record_id` (a retried Record)."""
        connection = self._session.connection()
        recorded = _AppendStatements.of(connection.dialect).recorded
        found = connection.exec_driver_sql(
            recorded.sql, recorded.parameters({"user_id": user_id, "record_id": record_id})
        )
        return found.first() is not None

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
        sql = _AppendStatements.of(connection.dialect)
        values = {"user_id": user_id, "record_id": record_id}
        values.update((name, getattr(entry, name)) for name in _ENTRY_FIELDS)
        connection.exec_driver_sql(sql.insert_entry.sql, sql.insert_entry.parameters(values))
        moved = {
            "head": user_id,
            "last_sequence": entry.sequence,
            "last_hash": entry.hash,
            "updated_at": entry.timestamp,
        }
        connection.exec_driver_sql(sql.move_head.sql, sql.move_head.parameters(moved))

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
