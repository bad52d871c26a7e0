"""Rate limits, degraded health, services that refuse unverified callers, and state that survives
a restart: each on a mesh of its own, because each changes the mesh's state."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import httpx
import pytest
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform.identity import Identity, IdentitySigner, generate_private_key_pem
from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import PASSWORD, new_email
from tests.mesh_identity import mesh_channel


def _concurrent_posts(url: str, path: str, bodies: list[dict]) -> tuple[list[httpx.Response], float]:
    """The bodies posted all at once from one client address; the answers in order, and how long
    the last one took."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            return list(await asyncio.gather(*(http.post(path, json=body) for body in bodies)))

    started = time.monotonic()
    answers = asyncio.run(burst())
    return answers, time.monotonic() - started


def test_register_and_login_are_rate_limited_per_client_ip_in_a_concurrent_burst(tmp_path: Path) -> None:
    tight = {
        "auth": {"PYTHONON_AUTH_CLIENT_IP_RATE_BURST": "3", "PYTHONON_AUTH_CLIENT_IP_RATE_PER_MINUTE": "1"}
    }
    too_many = {"code": 8, "message": "too many requests; retry later", "details": []}
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path, service_env=tight)) as mesh,
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        emails = [new_email() for _ in range(20)]
        answers, took = _concurrent_posts(
            mesh.url, "/api/register", [{"email": email, "password": PASSWORD} for email in emails]
        )
        statuses = [answer.status_code for answer in answers]
        assert sorted(statuses) == [201] * 3 + [429] * 17, statuses
        assert took < 10, f"20 registrations at once took {took:.1f} s"
        for answer in answers:
            if answer.status_code == 429:
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.json() == too_many
        created = [email for email, status in zip(emails, statuses, strict=True) if status == 201]
        refused = [email for email, status in zip(emails, statuses, strict=True) if status == 429]
        # Login has its own bucket: 20 logins of one account at once, 3 answered, 17 refused.
        logins, took = _concurrent_posts(
            mesh.url, "/api/login", [{"email": created[0], "password": PASSWORD}] * 20
        )
        assert sorted(login.status_code for login in logins) == [200] * 3 + [429] * 17
        assert took < 10, f"20 logins at once took {took:.1f} s"
        # The refused registrations were refused before they reached the service: only 3 accounts.
        with sqlite3.connect(mesh.database_url("auth").removeprefix("sqlite:///")) as db:
            stored = {email for (email,) in db.execute("SELECT email FROM auth_users")}
        assert stored == set(created) and not stored & set(refused)
        # Authenticated calls are not limited per IP.
        key = answers[statuses.index(201)].json()["apiKey"]
        assert client.post("/api/verify", headers={"x-api-key": key}, json={}).status_code == 200
        assert client.get("/health").status_code == 200


def test_authenticated_calls_are_rate_limited_per_user(tmp_path: Path) -> None:
    tight = {"auth": {"PYTHONON_AUTH_USER_RATE_BURST": "5", "PYTHONON_AUTH_USER_RATE_PER_MINUTE": "1"}}
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path, service_env=tight)) as mesh,
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        alice = client.post("/api/register", json={"email": new_email(), "password": PASSWORD}).json()
        bob = client.post("/api/register", json={"email": new_email(), "password": PASSWORD}).json()
        verify = [
            client.post("/api/verify", headers={"x-api-key": alice["apiKey"]}, json={}).status_code
            for _ in range(6)
        ]
        assert verify == [200] * 5 + [429]
        limited = client.post("/api/verify", headers={"x-api-key": alice["apiKey"]}, json={})
        assert limited.headers["retry-after"] == "60"
        assert limited.json()["code"] == 8
        # Another user has a bucket of their own.
        assert client.post("/api/verify", headers={"x-api-key": bob["apiKey"]}, json={}).status_code == 200


def test_health_is_503_and_names_the_service_that_is_down(tmp_path: Path) -> None:
    with Mesh(MeshConfig(port=0, data_dir=tmp_path, restart_limit=0)) as mesh:  # auth stays down
        assert httpx.get(f"{mesh.url}/health", timeout=10).status_code == 200
        os.kill(mesh.pids["auth"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            response = httpx.get(f"{mesh.url}/health", timeout=10)
            if response.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "degraded"
        assert body["services"]["auth"] == "down" and body["services"]["system"] == "ok"
        # With auth down, nothing authenticated gets through: the edge fails closed.
        refused = httpx.post(f"{mesh.url}/api/verify", headers={"x-api-key": "po_x"}, json={}, timeout=10)
        assert refused.status_code == 503
        assert refused.json() == {"code": 14, "message": "service unavailable", "details": []}


def test_services_refuse_callers_without_a_valid_identity_assertion(tmp_path: Path) -> None:
    with Mesh(MeshConfig(port=0, data_dir=tmp_path)) as mesh:
        genuine = IdentitySigner(mesh.identity_key_path.read_bytes())
        with httpx.Client(base_url=mesh.url, timeout=30) as client:
            user = client.post("/api/register", json={"email": new_email(), "password": PASSWORD}).json()
        identity = Identity(user["user"]["id"], user["user"]["email"])
        forged = IdentitySigner(generate_private_key_pem()).sign(identity)
        expired = genuine.sign(identity, now=time.time() - 600)

        # Straight to the auth service's own port, bypassing the edge.
        with mesh_channel(mesh, "auth") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            for metadata in (
                [],
                [("x-pythonon-identity", forged)],
                [("x-pythonon-identity", expired)],
                [("x-api-key", user["apiKey"])],
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Verify(auth_pb2.VerifyRequest(), metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            accepted = stub.Verify(
                auth_pb2.VerifyRequest(),
                metadata=[("x-pythonon-identity", genuine.sign(identity))],
                timeout=10,
            )
            assert accepted.id == user["user"]["id"]
        with mesh_channel(mesh, "system") as channel:
            # Public calls need no assertion.
            assert system_pb2_grpc.SystemServiceStub(channel).Info(system_pb2.InfoRequest(), timeout=10).name


def test_users_survive_a_restart_of_the_whole_mesh(tmp_path: Path) -> None:
    email = new_email()
    with Mesh(MeshConfig(port=0, data_dir=tmp_path)) as mesh:
        registered = httpx.post(
            f"{mesh.url}/api/register", json={"email": email, "password": PASSWORD}, timeout=30
        )
        assert registered.status_code == 201
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path)) as mesh,
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        login = client.post("/api/login", json={"email": email, "password": PASSWORD})
        assert login.status_code == 200
        assert login.json()["apiKey"] == registered.json()["apiKey"]
        # Keys survived too: the access token issued before the restart still verifies.
        bearer = {"authorization": f"Bearer {registered.json()['token']}"}
        assert client.post("/api/verify", headers=bearer, json={}).status_code == 200
