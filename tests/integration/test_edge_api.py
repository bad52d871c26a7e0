"""What the edge itself answers: unknown paths, oversized bodies, native gRPC,
health and info — through the same port a user's curl uses."""

from __future__ import annotations

import os

import grpc
import httpx
import pytest
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc
from pythonon.zk.v1 import zk_pb2, zk_pb2_grpc

from services.runner.mesh import SERVICES
from tests.integration.conftest import PASSWORD, new_email

ENDPOINTS = [
    ("executor", "POST", "/api/v1/execute", {"code": "print(1)"}),
    ("secrets", "PUT", "/api/v1/secrets/TOKEN", {"value": "x"}),
    ("secrets", "DELETE", "/api/v1/secrets/TOKEN", None),
    ("secrets", "GET", "/api/v1/secrets", None),
    ("audit", "GET", "/api/v1/audit", None),
    ("generator", "POST", "/api/v1/generate", {"prompt": "hello"}),
    ("packages", "GET", "/api/v1/packages", None),
    ("packages", "PUT", "/api/v1/packages", {"packages": ["requests"]}),
    ("packages", "POST", "/api/v1/packages", {"package": "requests"}),
    ("packages", "DELETE", "/api/v1/packages/requests", None),
    ("zk", "POST", "/api/v1/zk/encrypt", {"code": "print(1)", "password": "pw"}),
    ("zk", "PUT", "/api/v1/zk/code/job", {"language": "python"}),
    ("zk", "DELETE", "/api/v1/zk/code/job", None),
    ("zk", "GET", "/api/v1/zk/code", None),
    ("zk", "POST", "/api/v1/zk/execute/job", {"password": "pw"}),
]
BUILT = {spec.name for spec in SERVICES}


def test_every_section_is_served_by_a_built_service() -> None:
    # An unbuilt section would answer 501 through the system service (tests/edge, tests/system);
    # every section of the API is built in this version, so each endpoint below reaches its own.
    assert {section for section, *_ in ENDPOINTS} <= BUILT


@pytest.mark.parametrize(
    ("section", "method", "path", "body"), ENDPOINTS, ids=[f"{m} {p}" for _, m, p, _ in ENDPOINTS]
)
def test_every_section_requires_credentials(
    client: httpx.Client, section: str, method: str, path: str, body: dict | None
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 401
    assert response.json()["code"] == 16


def test_unknown_paths_get_a_json_404(client: httpx.Client) -> None:
    response = client.get("/no/such/path")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == 5


def test_oversized_bodies_get_a_json_413(client: httpx.Client) -> None:
    body = {"email": new_email(), "password": "x" * (5 * 1024 * 1024)}
    response = client.post("/api/register", json=body)
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text


def test_health_reports_every_section(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["services"]["auth"] == "ok" and body["services"]["system"] == "ok"
    assert body["services"]["database"] == "ok"
    for section in ("executor", "packages", "zk"):
        assert body["services"][section] == ("ok" if section in BUILT else "not_built")
    # Without ANTHROPIC_API_KEY in the runner's environment the generator runs unconfigured.
    assert body["services"]["generator"] == (
        "ok" if os.environ.get("ANTHROPIC_API_KEY") else "not_configured"
    )
    assert body["uptimeSeconds"] >= 0 and body["version"]


def test_info_names_limits_and_features(client: httpx.Client) -> None:
    response = client.get("/api/info")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Pyth-On"
    assert body["limits"]["timeoutDefaultSeconds"] == 10 and body["limits"]["timeoutMaxSeconds"] == 60
    assert body["limits"]["memoryMib"] == 256 and body["limits"]["network"] is False
    assert body["features"] == {section: section in BUILT for section in body["features"]}
    assert body["features"]["auth"] is True


def test_native_grpc_through_the_same_port(mesh) -> None:
    target = mesh.url.removeprefix("http://")
    with grpc.insecure_channel(target) as channel:
        info = system_pb2_grpc.SystemServiceStub(channel).Info(system_pb2.InfoRequest(), timeout=10)
        assert info.name == "Pyth-On"

        auth = auth_pb2_grpc.AuthServiceStub(channel)
        registered = auth.Register(
            auth_pb2.AuthRequest(email=new_email("grpc"), password=PASSWORD), timeout=10
        )
        verified = auth.Verify(
            auth_pb2.VerifyRequest(), metadata=[("x-api-key", registered.api_key)], timeout=10
        )
        assert verified.valid and verified.id == registered.user.id

        with pytest.raises(grpc.RpcError) as refused:
            auth.Verify(auth_pb2.VerifyRequest(), metadata=[("x-api-key", "po_wrong")], timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        audit = audit_pb2_grpc.AuditServiceStub(channel).ListEntries(
            audit_pb2.ListEntriesRequest(), metadata=[("x-api-key", registered.api_key)], timeout=10
        )
        assert [entry.action for entry in audit.entries] == ["auth.register"]

        if "zk" not in BUILT:
            with pytest.raises(grpc.RpcError) as unbuilt:
                zk_pb2_grpc.ZkServiceStub(channel).ListCode(
                    zk_pb2.ListCodeRequest(), metadata=[("x-api-key", registered.api_key)], timeout=10
                )
            assert unbuilt.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_native_grpc_bytes_that_are_not_the_message_are_refused_as_invalid(mesh) -> None:
    """A native gRPC client on the public port whose request bytes do not parse (a corrupt wire
    format, bad UTF-8 in a string): INVALID_ARGUMENT naming the message type, not gRPC's own UNKNOWN
    with a Python exception class, and no account created."""
    target = mesh.url.removeprefix("http://")
    email = new_email("garbled")
    valid = auth_pb2.AuthRequest(email=email, password=PASSWORD).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        register = channel.unary_unary("/pythonon.auth.v1.AuthService/Register")
        for garbled in (b"\xff\xff\xff\xff", valid.replace(b"@", b"\xff", 1)):
            with pytest.raises(grpc.RpcError) as refused:
                register(garbled, timeout=10)
            assert (refused.value.code(), refused.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid AuthRequest message",
            )
        login = auth_pb2_grpc.AuthServiceStub(channel).Login
        with pytest.raises(grpc.RpcError) as unknown:
            login(auth_pb2.AuthRequest(email=email, password=PASSWORD), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
