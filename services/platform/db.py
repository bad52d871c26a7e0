"""SQLAlchemy engines and Alembic migrations, the same on SQLite and PostgreSQL.

Each service owns its tables and its own Alembic version table, so services can share one
PostgreSQL database without reading each other's tables. Migrations run once, by an explicit step
(`pyth-on migrate`); a service only checks at start-up that its schema is at head."""

from __future__ import annotations

import ast
import asyncio
import contextvars
import functools
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from services.platform.settings import SettingsError

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
SERVICES_ROOT = Path(__file__).resolve().parent.parent


DATABASE_SCHEMES = ("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")


def is_database_url(url: str) -> bool:
    """Whether `url` names a database this code runs on (SQLite or PostgreSQL)."""
    return url.startswith(DATABASE_SCHEMES)


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# Connections each engine keeps, and so the worker threads a Database runs its transactions on.
POOL_SIZE = 10
# How long a SQLite write waits for another's write lock. Write transactions are short (no network
# call, no password hash inside one), so a wait this long means something is wrong.
SQLITE_BUSY_TIMEOUT_SECONDS = 10


def create_engine(url: str) -> Engine:
    """An engine that never prints statement parameters (password hashes, key digests) in errors
    or logs: `hide_parameters` keeps them out of every exception SQLAlchemy raises."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            hide_parameters=True,
            pool_size=POOL_SIZE,
            # A connection moves between worker threads, one at a time (see Database.run).
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
            _use_write_ahead_log(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(
        url, hide_parameters=True, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_SIZE
    )


def _use_write_ahead_log(cursor: Any) -> None:
    """Put a SQLite database in WAL mode (it stays so in the file). Two processes that open a new
    file at once can deadlock on the switch, and SQLite then answers "database is locked" at once,
    without its busy handler; the switch is retried until the busy timeout, as a write would wait."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            # SQLITE_BUSY and its extended codes: the one refusal worth waiting out.
            busy = error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass(frozen=True)
class Schema:
    """A service's tables: its Alembic migrations (services/<service>/migrations) and the version
    table that records how far they ran (alembic_version_<service>)."""

    service: str

    @property
    def migrations(self) -> Path:
        return SERVICES_ROOT / self.service / "migrations"

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    def alembic_config(self) -> Config:
        from alembic.config import Config  # only where migrations run (see _revisions)

        config = Config()
        config.set_main_option("script_location", str(self.migrations))
        config.attributes["version_table"] = self.version_table
        return config

    def head(self) -> str:
        """The latest revision of the migrations (a service keeps one line of them, not branches)."""
        revisions = self._revisions()
        heads = sorted(set(revisions) - set(revisions.values()))
        if not heads:
            raise ValueError(f"{self.migrations} holds no migrations")
        if len(heads) > 1:
            raise ValueError(f"{self.migrations} has more than one head: {', '.join(heads)}")
        return heads[0]

    def knows(self, revision: str) -> bool:
        return revision in self._revisions()

    def _revisions(self) -> dict[str, str | None]:
        """Each migration's revision and the one it follows, read from its file's module-level
        `revision` and `down_revision` as Alembic reads them, without importing Alembic: a service
        only checks its schema at start-up, and Alembic's modules would hold ~10 MiB of every
        database service's memory for that (tests/runner/test_migrate.py compares with Alembic's view)."""
        revisions: dict[str, str | None] = {}
        for path in sorted((self.migrations / "versions").glob("*.py")):
            values = {
                target.id: ast.literal_eval(statement.value)
                for statement in ast.parse(path.read_text(), str(path)).body
                if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None
                for target in (statement.targets if isinstance(statement, ast.Assign) else [statement.target])
                if isinstance(target, ast.Name) and target.id in ("revision", "down_revision")
            }
            if "revision" in values:
                revisions[values["revision"]] = values.get("down_revision")
        return revisions

    def lock_key(self) -> int:
        """A PostgreSQL advisory lock key of its own, so migrating one service never waits on another."""
        digest = hashlib.sha256(f"pythonon.migrate.{self.service}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class Migration:
    """What one migration run did: the revision before (None: no schema yet) and after."""

    schema: Schema
    before: str | None
    after: str

    def describe(self) -> str:
        if self.before == self.after:
            return f"{self.schema.service}: already at {self.after}"
        if self.before is None:
            return f"{self.schema.service}: schema created at {self.after}"
        return f"{self.schema.service}: migrated from {self.before} to {self.after}"


class SchemaNotAtHead(SettingsError):
    """The database a service was given is not at the schema this code expects. Like a bad
    setting, it is the operator's to fix, so the service refuses to start (exit 2) rather than
    migrating itself and racing its replicas."""


class Database:
    """An engine, a session factory, and short transactions run off the event loop.

    How work reaches the database (every service runs this way):
    - One call of `run` is one transaction on one session, opened, committed (or rolled back) and
      closed by one worker thread. Nothing else ever touches that session or its connection. If
      the awaiting coroutine is cancelled (the caller hung up, a deadline passed), the thread still
      finishes the transaction by itself; nobody rolls it back or closes it from another thread.
      (Doing so is what crashed auth inside libsqlite3: a rollback and close on one thread while
      another was still executing on the same pysqlite connection.)
    - A transaction holds no await: no network call, no audit record, no password hash runs inside
      one, so SQLite's single write lock (and PostgreSQL's row locks) are held for milliseconds.
    - A change and its audit record are therefore two steps, not one transaction; the service
      orders them so that nothing acknowledged goes unlogged and a change whose record failed is
      undone or never made (see services/platform/audit.py and each service's logic), and runs the
      pair to completion whatever happens to the request (`audit.run_to_completion`).
    - The worker threads are the database's own (as many as its pool has connections), so a queue
      of password hashes or other blocking work never delays a query."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._threads = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="database")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    async def run(self, work: Callable[[Session], T]) -> T:
        """Run `work(session)` in one transaction on a worker thread; commit when it returns, roll
        back if it raises. `work` must not block on anything but the database."""

        def in_transaction() -> T:
            with self.transaction() as session:
                return work(session)

        # The request's context (trace span, request scope) goes along, as asyncio.to_thread does.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(context.run, in_transaction)
        )

    def current_revision(self, schema: Schema) -> str | None:
        with self.engine.connect() as connection:
            return _current_revision(connection, schema)

    def migrate(self, schema: Schema) -> Migration:
        """Bring the schema to head in one transaction. Concurrent runs are serialised (a
        PostgreSQL advisory lock, SQLite's write lock), so the second finds the work done."""
        from alembic import command

        config = schema.alembic_config()
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Held until the transaction ends; a second migrator waits here, then reads the
                # version table this one committed.
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": schema.lock_key()})
            elif connection.dialect.name == "sqlite":
                # pysqlite would run DDL outside any transaction; take the write lock first.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            before = _current_revision(connection, schema)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = _current_revision(connection, schema)
        if after is None:
            raise RuntimeError(f"{schema.service}: migrating left no revision in {schema.version_table}")
        return Migration(schema, before, after)

    def require_at_head(self, schema: Schema) -> None:
        """Raise SchemaNotAtHead unless the schema is exactly at the migrations' head."""
        head = schema.head()
        current = self.current_revision(schema)
        if current == head:
            return
        if current is None:
            raise SchemaNotAtHead(
                f"the {schema.service} database has no schema yet (expected revision {head}); "
                "run `pyth-on migrate` first"
            )
        if schema.knows(current):
            raise SchemaNotAtHead(
                f"the {schema.service} database's schema is at revision {current}, not {head}; "
                "run `pyth-on migrate` first"
            )
        raise SchemaNotAtHead(
            f"the {schema.service} database's schema is at revision {current}, which this version "
            f"does not know (its latest is {head}): a newer version migrated it; run that version"
        )

    def dispose(self) -> None:
        """Close the pool once every transaction still running has finished."""
        self._threads.shutdown(wait=True)
        self.engine.dispose()


def _current_revision(connection: Connection, schema: Schema) -> str | None:
    """The revision the schema's version table holds (None: no table, or an empty one)."""
    if not sa.inspect(connection).has_table(schema.version_table):
        return None
    found: list[str] = list(
        connection.execute(
            sa.select(sa.column("version_num")).select_from(sa.table(schema.version_table))
        ).scalars()
    )
    if len(found) > 1:
        raise RuntimeError(f"{schema.version_table} holds more than one revision: {', '.join(found)}")
    return found[0] if found else None


def run_migrations_online(target_metadata: sa.MetaData) -> None:
    """The body of every service's migrations/env.py."""
    from alembic import context

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
