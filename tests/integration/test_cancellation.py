"""A change and its audit record cannot be split by a caller that gives up or an edge that dies.

Clients that hang up after 5-80 ms, and an Envoy killed with changes in flight (held between their
Vault write and their record by a stopped audit service), must leave the secret store exactly as the
audit log tells it: replaying every user's `secrets.put` and
`secrets.delete` entries gives the secrets that exist, at their versions. The store and the log
are read directly (OpenBao with the root token, the audit database), so the check does not depend
on the edge coming back."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import hvac
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email

CLIENTS = 4
PUTS_PER_CLIENT = 50
DELETES_PER_CLIENT = 25
NAMES = [f"KEY_{index}" for index in range(5)]
# Units of work still running after their callers left finish within this (each step has its own
# deadline of a few seconds; here nothing is down, so they take milliseconds).
SETTLE_SECONDS = 3.0


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A mesh of this test's own: one of them kills its Envoy."""
    with Mesh(MeshConfig(port=0, data_dir=tmp_path / "mesh", service_env=GENEROUS_LIMITS)) as running:
        yield running


def register(mesh: Mesh) -> dict:
    response = httpx.post(
        f"{mesh.url}/api/register", json={"email": new_email("cancel"), "password": PASSWORD}, timeout=30
    )
    assert response.status_code == 201, response.text
    return response.json()


# -- what the store holds and what the log says -----------------------------------------------------


def stored_secrets(mesh: Mesh, user_id: str) -> dict[str, int]:
    """Name → current version of every live secret of the user, read from OpenBao itself."""
    root_token = json.loads(mesh.openbao_files.init_file.read_text())["root_token"]
    vault = hvac.Client(url=mesh.vault_address, token=root_token, timeout=10)
    folder = f"pythonon/users/{user_id}/"
    try:
        keys = vault.secrets.kv.v2.list_secrets(path=folder, mount_point="secret")["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return {}
    live = {}
    for name in keys:
        metadata = vault.secrets.kv.v2.read_secret_metadata(path=folder + name, mount_point="secret")["data"]
        current = int(metadata["current_version"])
        version = metadata["versions"].get(str(current)) or {}
        if current and version and not version["deletion_time"] and not version["destroyed"]:
            live[name] = current
    return live


def audited_secrets(mesh: Mesh, user_id: str) -> dict[str, int]:
    """Name → version, replaying the user's secrets entries of the audit database in order."""
    url = mesh.database_url("audit")
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        rows = db.execute(
            "SELECT action, resource, outcome, details FROM audit_entries "
            "WHERE user_id = ? AND action LIKE 'secrets.%' ORDER BY sequence",
            (user_id,),
        ).fetchall()
    secrets: dict[str, int] = {}
    for action, resource, outcome, details in rows:
        assert outcome == "success"
        name = resource.removeprefix("secret/")
        if action == "secrets.put":
            secrets[name] = int(json.loads(details)["version"])
        elif action == "secrets.delete":
            assert secrets.pop(name, None) is not None, f"{name} deleted without being put"
    return secrets


def assert_store_matches_the_log(mesh: Mesh, users: list[dict]) -> None:
    for user in users:
        user_id = user["user"]["id"]
        assert stored_secrets(mesh, user_id) == audited_secrets(mesh, user_id)


# -- the tests -----------------------------------------------------------------------------------------


async def _impatient_client(mesh: Mesh, user: dict) -> tuple[int, int]:
    """PUTs and DELETEs in a random order, each abandoned after 5-80 ms; returns (answered, gave up)."""
    operations = ["put"] * PUTS_PER_CLIENT + ["delete"] * DELETES_PER_CLIENT
    random.shuffle(operations)
    answered = gave_up = 0
    headers = {"x-api-key": user["apiKey"]}
    async with httpx.AsyncClient(base_url=mesh.url, headers=headers) as http:
        for operation in operations:
            name = random.choice(NAMES)
            timeout = random.uniform(0.005, 0.08)
            try:
                if operation == "put":
                    response = await http.put(
                        f"/api/v1/secrets/{name}", json={"value": os.urandom(8).hex()}, timeout=timeout
                    )
                    assert response.status_code == 200, response.text
                else:
                    response = await http.delete(f"/api/v1/secrets/{name}", timeout=timeout)
                    assert response.status_code in (200, 404), response.text
                answered += 1
            except httpx.TimeoutException:
                gave_up += 1
    return answered, gave_up


def test_clients_that_give_up_leave_no_change_without_its_record(mesh: Mesh) -> None:
    users = [register(mesh) for _ in range(CLIENTS)]

    async def everyone() -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(_impatient_client(mesh, user) for user in users)))

    outcomes = asyncio.run(everyone())
    gave_up = sum(given for _, given in outcomes)
    print(f"\n{CLIENTS * (PUTS_PER_CLIENT + DELETES_PER_CLIENT)} requests, {gave_up} abandoned")
    assert gave_up > 0  # the test means nothing if every request finished in time
    time.sleep(SETTLE_SECONDS)
    assert_store_matches_the_log(mesh, users)
    for user in users:
        verified = httpx.get(
            f"{mesh.url}/api/v1/audit/verify", headers={"x-api-key": user["apiKey"]}, timeout=30
        )
        assert verified.status_code == 200 and verified.json()["valid"] is True, verified.text
    # The secrets service logged the abandoned requests as cancelled, not as OK.
    assert '"outcome": "CANCELLED"' in Path(mesh.log_path("secrets")).read_text()


def test_killing_envoy_mid_put_leaves_no_change_without_its_record(mesh: Mesh) -> None:
    users = [register(mesh) for _ in range(2)]
    # Something to delete while Envoy dies.
    for user in users:
        for name in NAMES[:3]:
            response = httpx.put(
                f"{mesh.url}/api/v1/secrets/{name}",
                json={"value": "first"},
                headers={"x-api-key": user["apiKey"]},
                timeout=30,
            )
            assert response.status_code == 200, response.text

    async def in_flight() -> None:
        # One client per user, made before the requests (an httpx client takes milliseconds to make:
        # thirty made on the way would send nothing before Envoy dies).
        clients = [
            httpx.AsyncClient(
                base_url=mesh.url,
                headers={"x-api-key": user["apiKey"]},
                timeout=10,
                limits=httpx.Limits(max_connections=20),
            )
            for user in users
        ]

        async def change(http: httpx.AsyncClient, index: int) -> None:
            try:
                if index % 3 == 0:
                    await http.delete(f"/api/v1/secrets/{NAMES[index % 3]}")
                else:
                    await http.put(f"/api/v1/secrets/NEW_{index}", json={"value": os.urandom(8).hex()})
            except httpx.HTTPError:
                pass

        changes = [asyncio.create_task(change(http, index)) for http in clients for index in range(15)]
        # The audit service, stopped, holds the changes between their Vault write and their record
        # while Envoy dies: a handler that the cancellation stopped there would leave a change
        # without its record (or a deletion without its entry) once audit goes on.
        await asyncio.sleep(0.3)
        os.kill(mesh.pids["envoy"], signal.SIGKILL)
        await asyncio.gather(*changes)
        for http in clients:
            await http.aclose()

    os.kill(mesh.pids["audit"], signal.SIGSTOP)
    try:
        asyncio.run(in_flight())
    finally:
        os.kill(mesh.pids["audit"], signal.SIGCONT)
    time.sleep(SETTLE_SECONDS)
    assert_store_matches_the_log(mesh, users)
