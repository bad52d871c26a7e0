"""SQLite engines opened by several processes at once on a new file: the first switch to WAL mode
can deadlock between them, and SQLite then answers "database is locked" at once (two `pyth-on
migrate` at once on a new SQLite file failed so in CI)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

import sqlalchemy as sa

from services.platform.db import create_engine

PROCESSES = 4
ROUNDS = 20


def _open_and_write(url: str, barrier: Barrier) -> None:
    engine = create_engine(url)
    barrier.wait()
    with engine.begin() as connection:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    engine.dispose()


def test_processes_opening_a_new_file_at_once_all_write(tmp_path: Path) -> None:
    # Forked after the imports, so the processes reach the file within microseconds of each other:
    # before the fix, most runs of this test saw one fail.
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'new-{round_}.db'}"
        barrier = context.Barrier(PROCESSES)
        processes = [context.Process(target=_open_and_write, args=(url, barrier)) for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():  # stuck: fail below, and leave nothing running
                process.kill()
                process.join()
        assert [process.exitcode for process in processes] == [0] * PROCESSES, f"round {round_}"
        engine = create_engine(url)
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.execute(sa.text("SELECT count(*) FROM t")).scalar() == PROCESSES
        engine.dispose()
