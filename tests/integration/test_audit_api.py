"""The audit log through Envoy: a user's actions in order, a chain a client can verify, isolation,
and nothing acknowledged while the audit service is down."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import PASSWORD, new_email

GENESIS = "0" * 64


def recompute_hash(entry: dict) -> str:
    """The recipe in the README, written from the documentation alone."""
    fields = {
        "id": entry["id"],
        "sequence": entry["sequence"],
        "timestamp": entry["timestamp"],
        "action": entry["action"],
        "resource": entry["resource"],
        "outcome": entry["outcome"],
        "requestId": entry["requestId"],
        "clientIp": entry["clientIp"],
        "details": entry.get("details") or {},
        "prevHash": entry["prevHash"],
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def entries_of(client: httpx.Client, api_key: str, **params: object) -> list[dict]:
    response = client.get("/api/v1/audit", params=params, headers={"x-api-key": api_key})
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def test_a_users_actions_appear_newest_first_in_a_verifiable_chain(client: httpx.Client) -> None:
    email = new_email("audited")
    registered = client.post("/api/register", json={"email": email, "password": PASSWORD}).json()
    key = registered["apiKey"]
    assert (
        client.post("/api/login", json={"email": email, "password": "wrong horse battery"}).status_code == 401
    )
    assert client.post("/api/login", json={"email": email, "password": PASSWORD}).status_code == 200
    rotated = client.post("/api/refresh", json={"refreshToken": registered["refreshToken"]})
    assert rotated.status_code == 200
    assert client.post("/api/refresh", json={"refreshToken": registered["refreshToken"]}).status_code == 401

    entries = entries_of(client, key)
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("auth.refresh", "denied"),
        ("auth.refresh", "success"),
        ("auth.login", "success"),
        ("auth.login", "failure"),
        ("auth.register", "success"),
    ]
    assert [e["sequence"] for e in entries] == [5, 4, 3, 2, 1]
    assert all(e["resource"] == f"user/{registered['user']['id']}" for e in entries)
    assert all(e["clientIp"] == "127.0.0.1" and e["requestId"] for e in entries)
    assert entries[3]["details"] == {"reason": "wrong_password"}
    assert entries[0]["details"]["reason"] == "refresh_token_reuse"

    chain = list(reversed(entries))
    assert chain[0]["prevHash"] == GENESIS
    for previous, entry in zip([None, *chain], chain, strict=False):
        if previous is not None:
            assert entry["prevHash"] == previous["hash"]
        assert recompute_hash(entry) == entry["hash"]

    verified = client.get("/api/v1/audit/verify", headers={"x-api-key": key})
    assert verified.status_code == 200
    assert verified.json() == {
        "valid": True,
        "entries": 5,
        "brokenAtSequence": 0,
        "message": verified.json()["message"],
        "headHash": entries[0]["hash"],
    }


def test_pagination_and_filters(client: httpx.Client, user: dict) -> None:
    key = user["apiKey"]
    for _ in range(4):
        assert (
            client.post("/api/login", json={"email": user["user"]["email"], "password": PASSWORD}).status_code
            == 200
        )
    everything = entries_of(client, key)
    pages, cursor = [], ""
    while True:
        response = client.get(
            "/api/v1/audit", params={"limit": 2, "cursor": cursor}, headers={"x-api-key": key}
        )
        assert response.status_code == 200
        pages.append(response.json()["entries"])
        cursor = response.json()["nextCursor"]
        if not cursor:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [e["id"] for page in pages for e in page] == [e["id"] for e in everything]
    logins = entries_of(client, key, action="auth.login")
    assert len(logins) == 4 and {e["action"] for e in logins} == {"auth.login"}
    assert entries_of(client, key, since="2999-01-01T00:00:00Z") == []
    assert client.get("/api/v1/audit", params={"limit": -1}, headers={"x-api-key": key}).status_code == 400
    assert (
        client.get("/api/v1/audit", params={"cursor": "%%%"}, headers={"x-api-key": key}).status_code == 400
    )


def test_users_see_only_their_own_entries(client: httpx.Client) -> None:
    alice = client.post("/api/register", json={"email": new_email("alice"), "password": PASSWORD}).json()
    bob = client.post("/api/register", json={"email": new_email("bob"), "password": PASSWORD}).json()
    for _ in range(3):
        client.post("/api/login", json={"email": alice["user"]["email"], "password": PASSWORD})
    page = client.get("/api/v1/audit", params={"limit": 1}, headers={"x-api-key": alice["apiKey"]}).json()
    for params in ({}, {"action": "auth.login"}, {"cursor": page["nextCursor"]}, {"limit": 500}):
        seen = entries_of(client, bob["apiKey"], **params)
        assert all(e["resource"] == f"user/{bob['user']['id']}" for e in seen), params
    assert len(entries_of(client, bob["apiKey"])) == 1
    assert client.get("/api/v1/audit").status_code == 401


def _rows(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(query).fetchall()


def test_with_audit_down_mutations_answer_503_and_change_nothing(tmp_path: Path) -> None:
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path, restart_limit=0)) as mesh,  # audit stays down
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        email = new_email("before")
        registered = client.post("/api/register", json={"email": email, "password": PASSWORD}).json()
        auth_db = mesh.layout.db / "auth.db"
        tokens_before = _rows(auth_db, "SELECT id, used_at, revoked_at FROM auth_refresh_tokens ORDER BY id")

        os.kill(mesh.pids["audit"], signal.SIGKILL)
        time.sleep(0.2)
        new = new_email("during")
        refused = [
            client.post("/api/register", json={"email": new, "password": PASSWORD}),
            client.post("/api/login", json={"email": email, "password": PASSWORD}),
            client.post("/api/login", json={"email": email, "password": "wrong horse battery"}),
            client.post("/api/refresh", json={"refreshToken": registered["refreshToken"]}),
        ]
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.json()["code"] == 14
            assert "audit log is unavailable" in response.json()["message"]
        assert _rows(auth_db, f"SELECT email FROM auth_users WHERE email = '{new}'") == []
        assert (
            _rows(auth_db, "SELECT id, used_at, revoked_at FROM auth_refresh_tokens ORDER BY id")
            == tokens_before
        )
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["services"]["audit"] == "down"


def test_no_password_token_or_key_is_stored_in_the_audit_log(tmp_path: Path) -> None:
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path)) as mesh,
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        email = new_email("secretive")
        password = "Unmistakable-Passw0rd-" + base64.b32encode(os.urandom(5)).decode()
        wrong = "Another-Distinct-Guess-" + base64.b32encode(os.urandom(5)).decode()
        registered = client.post("/api/register", json={"email": email, "password": password}).json()
        client.post("/api/login", json={"email": email, "password": wrong})
        client.post("/api/login", json={"email": new_email("ghost"), "password": wrong})
        client.post("/api/refresh", json={"refreshToken": registered["refreshToken"]})
        client.post("/api/refresh", json={"refreshToken": registered["refreshToken"]})
        assert len(entries_of(client, registered["apiKey"])) == 4
    needles = [password, wrong, registered["apiKey"], registered["refreshToken"], registered["token"]]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "db").glob("audit.db*"))
    logs = b"".join(p.read_bytes() for p in (tmp_path / "logs").glob("*.log"))
    assert stored, "the audit database was not found"
    for needle in needles:
        assert needle.encode() not in stored
        assert needle.encode() not in logs
