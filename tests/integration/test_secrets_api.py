"""Secrets through Envoy on a whole mesh (OpenBao included), as curl would use them: the lifecycle,
the refusals, isolation between users, the internal resolver (reachable only beside the edge), no
value anywhere in the data directory, persistence across a restart, and OpenBao stopped mid-run."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.platform.identity import Identity, IdentitySigner
from services.platform.service_graph import IDENTITY_HEADER
from services.runner.mesh import Mesh, MeshConfig
from services.secrets.vault import UNAVAILABLE_MESSAGE
from tests.integration.conftest import PASSWORD, RFC3339, error_message, new_email
from tests.mesh_identity import mesh_channel


def unique_value() -> str:
    return f"value-{uuid.uuid4().hex}-never-shown"


def put(
    client: httpx.Client, user: dict, name: str, value: str, description: str | None = None
) -> httpx.Response:
    body = {"value": value} if description is None else {"value": value, "description": description}
    return client.put(f"/api/v1/secrets/{name}", json=body, headers={"x-api-key": user["apiKey"]})


def delete(client: httpx.Client, user: dict, name: str) -> httpx.Response:
    return client.delete(f"/api/v1/secrets/{name}", headers={"x-api-key": user["apiKey"]})


def listed(client: httpx.Client, user: dict) -> httpx.Response:
    return client.get("/api/v1/secrets", headers={"x-api-key": user["apiKey"]})


def register(client: httpx.Client, tag: str) -> dict:
    response = client.post("/api/register", json={"email": new_email(tag), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()


def resolve(mesh: Mesh, user: dict, *names: str, everything: bool = False) -> dict[str, str]:
    """Call the internal resolver as the executor does: beside the edge, with the user's assertion."""
    signer = IdentitySigner(mesh.identity_key_path.read_bytes())
    assertion = signer.sign(Identity(user["user"]["id"], user["user"]["email"]))
    with mesh_channel(mesh, "secrets") as channel:
        response = secrets_pb2_grpc.SecretsResolverServiceStub(channel).ResolveSecrets(
            secrets_pb2.ResolveSecretsRequest(names=list(names), all=everything),
            metadata=[(IDENTITY_HEADER, assertion)],
            timeout=10,
        )
    return dict(response.values)


def audit_of(client: httpx.Client, user: dict) -> list[tuple[str, str, dict]]:
    response = client.get("/api/v1/audit", headers={"x-api-key": user["apiKey"]})
    assert response.status_code == 200, response.text
    return [
        (e["action"], e["resource"], e["details"])
        for e in reversed(response.json()["entries"])
        if e["action"].startswith("secrets.")
    ]


# -- the lifecycle ---------------------------------------------------------------------------------


def test_put_put_list_delete_delete(client: httpx.Client, user: dict) -> None:
    first = put(client, user, "API_TOKEN", unique_value(), "the API's token")
    assert first.status_code == 200, first.text
    created = first.json()
    assert set(created) == {"name", "description", "version", "createdAt", "updatedAt"}
    assert (created["name"], created["description"], created["version"]) == (
        "API_TOKEN",
        "the API's token",
        1,
    )
    assert RFC3339.match(created["createdAt"]) and created["updatedAt"] == created["createdAt"]

    second = put(client, user, "API_TOKEN", unique_value())
    assert second.status_code == 200, second.text
    updated = second.json()
    assert (updated["version"], updated["description"], updated["createdAt"]) == (2, "", created["createdAt"])
    assert updated["updatedAt"] > created["updatedAt"]

    assert put(client, user, "OTHER", unique_value()).status_code == 200
    everything = listed(client, user)
    assert everything.status_code == 200
    assert [s["name"] for s in everything.json()["secrets"]] == ["API_TOKEN", "OTHER"]
    assert everything.json()["secrets"][0] == updated

    gone = delete(client, user, "API_TOKEN")
    assert gone.status_code == 200 and gone.json() == {}
    assert error_message(delete(client, user, "API_TOKEN"), 404, 5) == "no secret named API_TOKEN"
    assert [s["name"] for s in listed(client, user).json()["secrets"]] == ["OTHER"]

    assert audit_of(client, user) == [
        ("secrets.put", "secret/API_TOKEN", {"version": 1}),
        ("secrets.put", "secret/API_TOKEN", {"version": 2}),
        ("secrets.put", "secret/OTHER", {"version": 1}),
        ("secrets.delete", "secret/API_TOKEN", {"version": 2}),
    ]


def test_a_user_without_secrets_lists_none(client: httpx.Client, user: dict) -> None:
    response = listed(client, user)
    assert response.status_code == 200 and response.json() == {"secrets": []}


def test_the_list_of_a_user_who_had_none_shows_each_change_at_once(client: httpx.Client, user: dict) -> None:
    """A user without secrets is listed without asking Vault (the markers say they have none): the
    first put, the deletion of the last one and a put after it each show in the very next list."""
    for _ in range(2):
        assert listed(client, user).json() == {"secrets": []}
        assert put(client, user, "FIRST", unique_value()).status_code == 200
        assert [s["name"] for s in listed(client, user).json()["secrets"]] == ["FIRST"]
        assert delete(client, user, "FIRST").status_code == 200
        assert listed(client, user).json() == {"secrets": []}


def test_secrets_need_credentials(client: httpx.Client) -> None:
    assert error_message(client.get("/api/v1/secrets"), 401, 16).startswith("missing credentials")
    assert client.put("/api/v1/secrets/X", json={"value": "v"}).status_code == 401
    assert client.delete("/api/v1/secrets/X", headers={"x-api-key": "po_wrong"}).status_code == 401


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lower_case", "environment-variable name"),
        ("9LIVES", "environment-variable name"),
        ("DASH-ED", "environment-variable name"),
        ("A" * 65, "at most 64 characters"),
        ("PATH", "PATH is reserved"),
        ("PYTHONPATH", "PYTHONPATH is reserved"),
        ("PYTHONON_KEY", "starting with PYTHONON_ are reserved"),
        ("LD_PRELOAD", "LD_PRELOAD is reserved"),
    ],
)
def test_names_that_are_not_allowed_are_400(
    client: httpx.Client, user: dict, name: str, message: str
) -> None:
    assert message in error_message(put(client, user, name, "v"), 400, 3)
    assert message in error_message(delete(client, user, name), 400, 3)


def test_values_and_descriptions_are_bounded(client: httpx.Client, user: dict) -> None:
    assert put(client, user, "BIGGEST", "x" * 65536).status_code == 200
    message = error_message(put(client, user, "TOO_BIG", "x" * 65537), 400, 3)
    assert message == "a secret value is at most 65536 bytes (UTF-8); this one is 65537 bytes"
    assert error_message(put(client, user, "EMPTY", ""), 400, 3) == "a secret value is required"
    assert "NUL" in error_message(put(client, user, "NUL", "a\u0000b"), 400, 3)
    assert "description is at most 1024" in error_message(put(client, user, "DESC", "v", "d" * 1025), 400, 3)
    for control in ("\u0000", "\u001b[31m", "\r"):
        assert error_message(put(client, user, "CTRL", "v", f"a{control}b"), 400, 3) == (
            "a secret description cannot contain control characters (tabs and newlines are fine)"
        )
    assert put(client, user, "TABBED", "v", "two\tlines\nhere").status_code == 200
    assert delete(client, user, "TABBED").status_code == 200
    assert [s["name"] for s in listed(client, user).json()["secrets"]] == ["BIGGEST"]


def test_a_user_holds_at_most_100_secrets(client: httpx.Client, user: dict) -> None:
    for number in range(100):
        assert put(client, user, f"S{number:03d}", "v").status_code == 200
    message = error_message(put(client, user, "ONE_MORE", "v"), 400, 3)
    assert message == "you already have 100 secrets, the most allowed; delete one to add another"
    assert put(client, user, "S000", "updated").json()["version"] == 2
    assert delete(client, user, "S001").status_code == 200
    assert put(client, user, "ONE_MORE", "v").status_code == 200
    assert len(listed(client, user).json()["secrets"]) == 100


# -- isolation -------------------------------------------------------------------------------------


def test_one_user_can_never_read_list_overwrite_or_delete_anothers(mesh: Mesh, client: httpx.Client) -> None:
    alice, bob = register(client, "alice"), register(client, "bob")
    alices_value, bobs_value = unique_value(), unique_value()
    assert put(client, alice, "SHARED_NAME", alices_value, "alice's").status_code == 200
    assert put(client, alice, "ALICE_ONLY", alices_value).status_code == 200

    assert listed(client, bob).json() == {"secrets": []}
    assert error_message(delete(client, bob, "ALICE_ONLY"), 404, 5) == "no secret named ALICE_ONLY"
    overwritten = put(client, bob, "SHARED_NAME", bobs_value, "bob's")
    assert overwritten.status_code == 200 and overwritten.json()["version"] == 1
    assert resolve(mesh, bob, everything=True) == {"SHARED_NAME": bobs_value}
    with pytest.raises(grpc.RpcError) as missing:
        resolve(mesh, bob, "ALICE_ONLY")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "no secret named ALICE_ONLY"
    assert delete(client, bob, "SHARED_NAME").status_code == 200

    alices = listed(client, alice).json()["secrets"]
    assert [(s["name"], s["description"], s["version"]) for s in alices] == [
        ("ALICE_ONLY", "", 1),
        ("SHARED_NAME", "alice's", 1),
    ]
    assert resolve(mesh, alice, "SHARED_NAME", "ALICE_ONLY") == {
        "SHARED_NAME": alices_value,
        "ALICE_ONLY": alices_value,
    }
    assert [action for action, _, _ in audit_of(client, bob)] == ["secrets.put", "secrets.delete"]


def test_the_resolver_is_not_reachable_through_the_edge(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    assert put(client, user, "INTERNAL_ONLY", unique_value()).status_code == 200
    path = "/pythonon.secrets.v1.SecretsResolverService/ResolveSecrets"
    rest = client.post(path, json={"all": True}, headers={"x-api-key": user["apiKey"]})
    assert rest.status_code == 404 and "INTERNAL_ONLY" not in rest.text
    with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            secrets_pb2_grpc.SecretsResolverServiceStub(channel).ResolveSecrets(
                secrets_pb2.ResolveSecretsRequest(all=True),
                metadata=[("x-api-key", user["apiKey"])],
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- values stay in Vault --------------------------------------------------------------------------


def _database_rows(url: str) -> str:
    """Every row of every table of the mesh's PostgreSQL database, as text."""
    with psycopg.connect(url) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        assert tables
        return "\n".join(
            str(row) for (table,) in tables for row in connection.execute(f'SELECT t::text FROM "{table}" t')
        )


def test_a_value_appears_in_no_response_log_audit_row_or_database_file(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    first, second = unique_value(), unique_value()
    responses = [
        put(client, user, "NEEDLE", first, "the needle"),
        put(client, user, "NEEDLE", second),
        listed(client, user),
        put(client, user, "GONE", first),
        delete(client, user, "GONE"),
        client.get("/api/v1/audit", headers={"x-api-key": user["apiKey"]}),
        client.get("/health"),
    ]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert resolve(mesh, user, "NEEDLE") == {"NEEDLE": second}  # it is stored, somewhere
    for response in responses:
        assert first not in response.text and second not in response.text

    time.sleep(0.5)  # let the processes' last log lines reach their files
    root = mesh.layout.root
    vault_storage = mesh.openbao_files.storage
    outside, inside = [], []
    for path in root.rglob("*"):
        if path.is_file():
            (inside if vault_storage in path.parents else outside).append(path)
    assert any(p.suffix == ".log" for p in outside) and inside
    for path in outside + inside:  # OpenBao's own storage is encrypted: no plaintext there either
        content = path.read_bytes()
        assert first.encode() not in content and second.encode() not in content, path
    if mesh.config.database_url:
        rows = _database_rows(mesh.config.database_url)
        assert "secrets.put" in rows
        assert first not in rows and second not in rows
    else:
        assert (mesh.layout.db / "audit.db").exists()


# -- restarts and outages --------------------------------------------------------------------------


def test_secrets_survive_a_restart_and_a_stopped_vault_is_503(tmp_path: Path) -> None:
    value = unique_value()
    config = MeshConfig(port=0, data_dir=tmp_path, restart_limit=0)  # OpenBao stays down once killed
    with Mesh(config) as mesh, httpx.Client(base_url=mesh.url, timeout=30) as client:
        user = register(client, "restart")
        stored = put(client, user, "PERSISTENT", value, "kept across restarts").json()
        assert put(client, user, "SECOND", value).status_code == 200

    with Mesh(config) as mesh, httpx.Client(base_url=mesh.url, timeout=30) as client:
        assert listed(client, user).json()["secrets"][0] == stored
        assert [s["name"] for s in listed(client, user).json()["secrets"]] == ["PERSISTENT", "SECOND"]
        assert resolve(mesh, user, everything=True) == {"PERSISTENT": value, "SECOND": value}
        assert client.get("/health").json()["services"]["vault"] == "ok"
        other = register(client, "restart-other")
        assert put(client, other, "NEVER_LISTED", value).status_code == 200
        before = listed(client, user).json()

        os.killpg(mesh.pids["openbao"], signal.SIGKILL)
        time.sleep(0.2)
        for response in (
            put(client, user, "DURING", "v"),
            put(client, user, "PERSISTENT", "v"),
            delete(client, user, "SECOND"),
            listed(client, other),
        ):
            assert error_message(response, 503, 14) == UNAVAILABLE_MESSAGE
        # A list kept since the user's last change is still that user's list: no change can be
        # acknowledged while Vault is down.
        assert listed(client, user).json() == before
        with pytest.raises(grpc.RpcError) as unavailable:
            resolve(mesh, user, "PERSISTENT")
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert unavailable.value.details() == UNAVAILABLE_MESSAGE

        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and health.json()["services"]["vault"] == "down"
        assert health.json()["services"]["secrets"] == "ok"
        # Nothing refused was recorded as done.
        assert [action for action, _, _ in audit_of(client, user)] == ["secrets.put", "secrets.put"]
