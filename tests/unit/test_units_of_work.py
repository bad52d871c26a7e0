"""Units of work under cancellation: database transactions that callers abandon, changes that must
finish with their audit record, and SQL parameters kept out of errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from services.platform.audit import run_to_completion, wait_for_units_of_work
from services.platform.db import Database
from services.platform.identity import RequestScope, current_request, request_scope

# A burst of callers that hang up while their transactions run, 40 times. The old unit of work
# rolled back and closed a session on one thread while a cancelled call was still executing on it
# on another: pysqlite then crashed inside libsqlite3 (SIGSEGV in sqlite3_changes) within a few
# rounds. The instrumentation counts any statement or rollback that enters a connection another
# thread is inside.
_HANG_UP_BURSTS = textwrap.dedent(
    """
    import asyncio, random, sys, threading, uuid
    import sqlalchemy as sa
    from sqlalchemy import event
    from services.platform.db import Database

    db = Database(f"sqlite:///{sys.argv[1]}")
    with db.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (id TEXT PRIMARY KEY, payload TEXT)")
    inside, overlaps, guard = {}, [], threading.Lock()

    def enter(connection):
        with guard:
            users = inside.setdefault(id(connection.connection.dbapi_connection), set())
            if users - {threading.get_ident()}:
                overlaps.append(1)
            users.add(threading.get_ident())

    def leave(connection):
        with guard:
            inside[id(connection.connection.dbapi_connection)].discard(threading.get_ident())

    event.listen(db.engine, "before_cursor_execute", lambda c, *a: enter(c))
    event.listen(db.engine, "after_cursor_execute", lambda c, *a: leave(c))
    event.listen(db.engine, "rollback", lambda c: (enter(c), leave(c)))

    def insert(session):
        session.execute(sa.text("INSERT INTO t VALUES (:id, :p)"), {"id": uuid.uuid4().hex, "p": "x" * 2000})

    async def change_then_record():
        await db.run(insert)
        await asyncio.sleep(random.uniform(0.001, 0.03))  # the audit call
        await db.run(insert)

    async def main():
        for _ in range(40):
            calls = [asyncio.create_task(change_then_record()) for _ in range(20)]
            await asyncio.sleep(random.uniform(0.005, 0.05))
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        db.dispose()
        print(f"overlaps={len(overlaps)}")

    asyncio.run(main())
    """
)


def test_callers_hanging_up_never_share_a_connection_between_threads(tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", _HANG_UP_BURSTS, str(tmp_path / "burst.sqlite")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert ended.stdout.strip() == "overlaps=0"


def test_an_abandoned_transaction_still_commits(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with db.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")

    def slow_insert(session: sa.orm.Session) -> None:
        session.execute(sa.text("INSERT INTO t VALUES (1)"))
        session.execute(
            sa.text(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 300000) SELECT count(*) FROM c"
            )
        )

    async def abandon() -> None:
        call = asyncio.ensure_future(db.run(slow_insert))
        await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(abandon())
    db.dispose()  # waits for the worker thread
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1


def test_a_unit_of_work_finishes_when_its_request_is_cancelled() -> None:
    finished: list[str] = []

    async def change_and_record() -> str:
        await asyncio.sleep(0.05)  # the change
        await asyncio.sleep(0.05)  # its record
        finished.append(request_scope().request_id)
        return "done"

    async def scenario() -> None:
        current_request.set(RequestScope(identity=None, request_id="req-1", client_ip="", assertion=""))
        request = asyncio.ensure_future(run_to_completion(change_and_record(), action="test.change"))
        await asyncio.sleep(0.02)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert finished == []
        assert await wait_for_units_of_work(5) == 0
        # It ran to its end, in the request's context.
        assert finished == ["req-1"]
        assert await run_to_completion(change_and_record(), action="test.change") == "done"

    asyncio.run(scenario())


def test_errors_never_carry_sql_parameters(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with db.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, password_hash TEXT UNIQUE)")
    secret = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"

    def insert_twice(session: sa.orm.Session) -> None:
        for _ in range(2):
            session.execute(sa.text("INSERT INTO users (password_hash) VALUES (:h)"), {"h": secret})

    with pytest.raises(IntegrityError) as raised:
        asyncio.run(db.run(insert_twice))
    assert "UNIQUE constraint failed" in str(raised.value)
    assert "SQL parameters hidden" in str(raised.value)
    assert secret not in str(raised.value) and secret not in repr(raised.value)
    db.dispose()
