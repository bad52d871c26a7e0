"""What the edge itself answers: unbuilt sections, unknown paths, oversized bodies, native gRPC,
health and info — through the same port a user's curl uses."""

from __future__ import annotations

import grpc
import httpx
import pytest
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from tests.integration.conftest import PASSWORD, new_email

UNBUILT = [
    ("POST", "/api/v1/execute", {"code": "print(1)"}),
    ("PUT", "/api/v1/secrets/TOKEN", {"value": "x"}),
    ("DELETE", "/api/v1/secrets/TOKEN", None),
    ("GET", "/api/v1/secrets", None),
    ("GET", "/api/v1/audit", None),
    ("POST", "/api/v1/generate", {"prompt": "hello"}),
    ("GET", "/api/v1/packages", None),
    ("PUT", "/api/v1/packages", {"packages": ["requests"]}),
    ("POST", "/api/v1/packages", {"package": "requests"}),
    ("DELETE", "/api/v1/packages/requests", None),
    ("POST", "/api/v1/zk/encrypt", {"code": "print(1)", "password": "pw"}),
    ("PUT", "/api/v1/zk/code/job", {"language": "python"}),
    ("DELETE", "/api/v1/zk/code/job", None),
    ("GET", "/api/v1/zk/code", None),
    ("POST", "/api/v1/zk/execute/job", {"password": "pw"}),
]


@pytest.mark.parametrize(("method", "path", "body"), UNBUILT, ids=[f"{m} {p}" for m, p, _ in UNBUILT])
def test_unbuilt_sections_answer_501_to_an_authenticated_user(
    client: httpx.Client, user: dict, method: str, path: str, body: dict | None
) -> None:
    response = client.request(method, path, json=body, headers={"x-api-key": user["apiKey"]})
    assert response.status_code == 501, response.text
    payload = response.json()
    assert payload["code"] == 12
    assert "not available in this version yet" in payload["message"]


def test_unbuilt_sections_still_require_credentials(client: httpx.Client) -> None:
    response = client.post("/api/v1/execute", json={"code": "print(1)"})
    assert response.status_code == 401
    assert response.json()["code"] == 16


def test_unknown_paths_get_a_json_404(client: httpx.Client) -> None:
    response = client.get("/no/such/path")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == 5


def test_oversized_bodies_get_a_json_413(client: httpx.Client) -> None:
    body = {"email": new_email(), "password": "x" * (2 * 1024 * 1024)}
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
    assert body["services"]["executor"] == "not_built"
    assert body["uptimeSeconds"] >= 0 and body["version"]


def test_info_names_limits_and_features(client: httpx.Client) -> None:
    response = client.get("/api/info")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Pyth-On"
    assert body["limits"]["timeoutDefaultSeconds"] == 10 and body["limits"]["timeoutMaxSeconds"] == 60
    assert body["limits"]["memoryMib"] == 256 and body["limits"]["network"] is False
    assert body["features"]["auth"] is True and body["features"]["executor"] is False


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

        with pytest.raises(grpc.RpcError) as unbuilt:
            executor_pb2_grpc.ExecutorServiceStub(channel).Execute(
                executor_pb2.ExecuteRequest(code="print(1)"),
                metadata=[("x-api-key", registered.api_key)],
                timeout=10,
            )
        assert unbuilt.value.code() == grpc.StatusCode.UNIMPLEMENTED
