"""The whole mesh, started by the same runner as `make run`, driven through Envoy as curl would."""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.postgres import throwaway_database

_emails = itertools.count()
_RUN = uuid.uuid4().hex[:8]
PASSWORD = "correct horse battery staple"
# The shared meshes register hundreds of users from 127.0.0.1; the rate-limit tests start their own.
GENEROUS_LIMITS = {"auth": {"PYTHONON_AUTH_CLIENT_IP_RATE_BURST": "100000"}}


def new_email(tag: str = "user") -> str:
    return f"{tag}-{next(_emails)}-{_RUN}@example.com"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One mesh per database backend, shared by the tests of a session."""
    data_dir = tmp_path_factory.mktemp(f"mesh-{request.param}")
    if request.param == "sqlite":
        with Mesh(MeshConfig(port=0, data_dir=data_dir, service_env=GENEROUS_LIMITS)) as running:
            yield running
    else:
        with throwaway_database() as url:
            config = MeshConfig(port=0, data_dir=data_dir, database_url=url, service_env=GENEROUS_LIMITS)
            with Mesh(config) as running:
                yield running


@pytest.fixture()
def client(mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.url, timeout=30) as http:
        yield http


@pytest.fixture()
def user(client: httpx.Client) -> dict:
    """A freshly registered user: the register response plus the password."""
    email = new_email()
    response = client.post("/api/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    return {**response.json(), "password": PASSWORD}


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def error_message(response: httpx.Response, status: int, code: int) -> str:
    """Assert a google.rpc.Status JSON error with this HTTP status and gRPC code; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code and body["details"] == []
    assert "Traceback" not in response.text
    return body["message"]


def data_dir_of(mesh: Mesh) -> Path:
    return Path(mesh.config.data_dir)


def processes_with(marker: str) -> list[int]:
    """Processes of this host whose command line holds `marker` (e.g. a sandboxed program's)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found.append(int(name))
            except OSError:
                continue
    return found


def wait_until_running(marker: str) -> None:
    """Until a process whose command line holds `marker` (the sandboxed program) runs."""
    deadline = time.monotonic() + 10
    while not processes_with(marker):
        assert time.monotonic() < deadline, "the sandboxed program never showed"
        time.sleep(0.05)


def seconds_until_gone(marker: str, since: float) -> float:
    """Until no process holds `marker` (at most 5 s after `since`, the hang-up); the seconds taken."""
    while processes_with(marker):
        assert time.monotonic() - since < 5, "the sandbox outlived its caller"
        time.sleep(0.05)
    return time.monotonic() - since
