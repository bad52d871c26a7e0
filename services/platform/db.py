"""SQLAlchemy engines and Alembic migrations, the same on SQLite and PostgreSQL.

Each service owns its tables and its own Alembic version table, so services can share one
PostgreSQL database without reading each other's tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class UnitOfWork:
    """An open transaction; `run` executes blocking work in it on a worker thread."""

    def __init__(self, session: Session) -> None:
        self._session = session

    async def run(self, work: Callable[[Session], T]) -> T:
        return await asyncio.to_thread(work, self._session)


class Database:
    """An engine, a session factory, and a way to run blocking work off the event loop."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Any:
        with self._sessions.begin() as session:
            yield session

    async def run(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in one transaction in a worker thread; commit when it returns."""

        def _in_transaction() -> T:
            with self.transaction() as session:
                return work(session)

        return await asyncio.to_thread(_in_transaction)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        """One transaction spanning awaits: commit when the block ends, roll back if it raises.

        Lets a service write, then record the action in the audit log, then commit, so a change
        whose record could not be written is never kept."""
        session = self._sessions()
        try:
            yield UnitOfWork(session)
            await asyncio.to_thread(session.commit)
        except BaseException:
            await asyncio.to_thread(session.rollback)
            raise
        finally:
            await asyncio.to_thread(session.close)

    def migrate(self, migrations: Path, version_table: str) -> None:
        """Bring the schema up to date with the service's Alembic migrations."""
        config = Config()
        config.set_main_option("script_location", str(migrations))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            config.attributes["version_table"] = version_table
            command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def run_migrations_online(target_metadata: sa.MetaData) -> None:
    """The body of every service's migrations/env.py."""
    connection: Connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=context.config.attributes["version_table"],
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite hands back naive values)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware ones")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utc_now() -> datetime:
    return datetime.now(UTC)
