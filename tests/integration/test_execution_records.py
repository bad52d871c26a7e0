"""Every run that starts is in the audit log, whatever the caller or the audit service does: a run
whose client hangs up is stopped and recorded as cancelled; a run whose record is slow to be
confirmed is answered once it is, and one whose record cannot be confirmed in time is answered with
a 503 that says the code ran, withholding its output."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.executor.execution import RECORD_DEADLINE_SECONDS
from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import (
    GENEROUS_LIMITS,
    PASSWORD,
    new_email,
    seconds_until_gone,
    wait_until_running,
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp("execution-records")
    with Mesh(MeshConfig(port=0, data_dir=data_dir, service_env=GENEROUS_LIMITS)) as running:
        yield running


@pytest.fixture()
def user(mesh: Mesh) -> dict:
    response = httpx.post(
        f"{mesh.url}/api/register", json={"email": new_email("runs"), "password": PASSWORD}, timeout=30
    )
    assert response.status_code == 201, response.text
    return response.json()


def executions(mesh: Mesh, user: dict) -> list[dict]:
    response = httpx.get(
        f"{mesh.url}/api/v1/audit",
        params={"action": "executor.execute", "limit": 100},
        headers={"x-api-key": user["apiKey"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def test_a_run_whose_client_hangs_up_is_stopped_and_recorded_as_cancelled(mesh: Mesh, user: dict) -> None:
    # The program becomes a process whose command line the host can see, then sleeps; the client
    # hangs up (closes its connection) once that process runs.
    marker = f"hang-up-marker-{uuid.uuid4().hex}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(50)', {marker!r}])"
    body = json.dumps({"code": code, "timeout": 55}).encode()
    host, port = mesh.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /api/v1/execute HTTP/1.1\r\nhost: pyth-on\r\ncontent-type: application/json\r\n"
            + f"x-api-key: {user['apiKey']}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until_running(marker)
    gone_after = seconds_until_gone(marker, time.monotonic())
    deadline = time.monotonic() + 10
    while not executions(mesh, user):
        assert time.monotonic() < deadline, "the abandoned run was never recorded"
        time.sleep(0.2)
    (entry,) = executions(mesh, user)
    assert (entry["outcome"], entry["details"]["reason"]) == ("cancelled", "caller_gone")
    print(f"\nthe sandboxed program was gone {gone_after:.2f} s after the hang-up, and recorded")


def _paused(pid: int, seconds: float) -> threading.Thread:
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
    resume.start()
    return resume


def test_a_run_whose_record_is_slow_is_answered_once_the_record_is_confirmed(mesh: Mesh, user: dict) -> None:
    resume = _paused(mesh.pids["audit"], 4.0)  # longer than one attempt's 3 s deadline
    try:
        response = httpx.post(
            f"{mesh.url}/api/v1/execute",
            json={"code": "print('ran once')"},
            headers={"x-api-key": user["apiKey"]},
            timeout=60,
        )
    finally:
        resume.join()
    assert response.status_code == 200, response.text
    assert response.json()["output"] == "ran once\n"
    recorded = executions(mesh, user)
    # Every attempt carried the execution id as its record id: stored once.
    assert [entry["resource"] for entry in recorded] == [f"execution/{response.json()['executionId']}"]
    assert recorded[0]["outcome"] == "success"


def test_a_run_whose_record_cannot_be_confirmed_is_503_saying_it_ran(mesh: Mesh, user: dict) -> None:
    resume = _paused(mesh.pids["audit"], RECORD_DEADLINE_SECONDS + 3)
    try:
        response = httpx.post(
            f"{mesh.url}/api/v1/execute",
            json={"code": "print('secret output')"},
            headers={"x-api-key": user["apiKey"]},
            timeout=60,
        )
    finally:
        resume.join()
    assert response.status_code == 503, response.text
    message = response.json()["message"]
    assert message.startswith("the code ran, but the audit log could not confirm its record")
    assert "not carried out" not in message
    assert "secret output" not in response.text
    # The attempts that reached the paused audit service are stored once it resumes: the run is in
    # the log (once), as it did run.
    deadline = time.monotonic() + 10
    while not executions(mesh, user):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (entry,) = executions(mesh, user)
    assert entry["outcome"] == "success" and entry["resource"].removeprefix("execution/") in message
    assert Path(mesh.log_path("executor")).exists()
