"""The API described to its users, through the edge of a whole mesh: the OpenAPI document
(validated, served, and fuzzed with schemathesis), the /docs page in a real headless Chromium, and
server reflection and grpc.health.v1 for native gRPC clients, listing the public services only."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, Phase, settings
from openapi_spec_validator import validate
from schemathesis import checks as st_checks

from edge import config, openapi
from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email

DOCUMENT = json.loads(openapi.DOCUMENT.read_text())
PUBLIC_SERVICES = sorted(service.full_name for service in config.services())
INTERNAL_SERVICES = [
    "pythonon.audit.v1.AuditRecorderService",
    "pythonon.secrets.v1.SecretsResolverService",
    "pythonon.packages.v1.PackagesResolverService",
    "pythonon.executor.v1.ExecutorCapabilitiesService",
    "pythonon.executor.v1.ExecutorEncryptedService",
    "pythonon.executor.v1.SandboxRunnerService",
    "envoy.service.auth.v3.Authorization",
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One mesh for the module; the packages index is a closed local port, so that fuzzed package
    lists fail to build at once instead of reaching out."""
    env = {**GENEROUS_LIMITS, "packages": {"PYTHONON_PACKAGES_INDEX_URL": "http://127.0.0.1:9/simple"}}
    with Mesh(
        MeshConfig(port=0, data_dir=tmp_path_factory.mktemp("mesh-described"), service_env=env)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def api_key(mesh: Mesh) -> str:
    response = httpx.post(
        f"{mesh.url}/api/register", json={"email": new_email("described"), "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    return response.json()["apiKey"]


# -- the document ----------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


def test_the_document_describes_every_rest_path_with_its_auth_and_statuses() -> None:
    paths = DOCUMENT["paths"]
    assert sorted(paths) == sorted(
        [
            "/api/register", "/api/login", "/api/verify", "/api/refresh", "/api/v1/execute",
            "/api/v1/execute/stream",
            "/api/v1/secrets/{name}", "/api/v1/secrets", "/api/v1/audit", "/api/v1/audit/verify",
            "/health", "/api/info", "/api/openapi.json", "/docs", "/api/v1/generate", "/api/v1/packages",
            "/api/v1/packages/{name}", "/api/v1/zk/encrypt", "/api/v1/zk/code/{name}", "/api/v1/zk/code",
            "/api/v1/zk/execute/{name}",
        ]
    )  # fmt: skip
    assert sorted(paths["/api/v1/packages"]) == ["get", "post", "put"]
    # The streaming execute: the same request as execute, its events newline-delimited.
    stream = paths["/api/v1/execute/stream"]["post"]
    assert stream["requestBody"] == paths["/api/v1/execute"]["post"]["requestBody"]
    assert list(stream["responses"]["200"]["content"]) == ["application/x-ndjson"]
    public = {
        (path, method)
        for path, methods in paths.items()
        for method, op in methods.items()
        if op.get("security") == []
    }
    assert public == {
        ("/api/register", "post"), ("/api/login", "post"), ("/api/refresh", "post"), ("/health", "get"),
        ("/api/info", "get"), ("/api/openapi.json", "get"), ("/docs", "get"),
    }  # fmt: skip
    assert DOCUMENT["security"] == [{"ApiKey": []}, {"BearerJwt": []}]
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert (schemes["BearerJwt"]["scheme"], schemes["BearerJwt"]["bearerFormat"]) == ("bearer", "JWT")

    register = paths["/api/register"]["post"]
    assert sorted(register["responses"]) == ["201", "400", "409", "413", "429", "503"]
    assert register["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AuthRequest"
    }
    assert sorted(paths["/api/v1/zk/execute/{name}"]["post"]["responses"]) == [
        "200", "400", "401", "403", "404", "413", "429", "503"
    ]  # fmt: skip
    assert "503" in paths["/api/v1/generate"]["post"]["responses"]
    health = paths["/health"]["get"]["responses"]
    assert health["503"]["content"] == health["200"]["content"]  # a degraded health still says what is down
    # JSON (camelCase) field names, proto comments as descriptions, the path variable out of the body.
    schemas = DOCUMENT["components"]["schemas"]
    assert set(schemas["ExecuteResponse"]["properties"]) == {
        "output", "error", "exitCode", "durationMs", "timedOut", "truncated", "executionId"
    }  # fmt: skip
    assert schemas["ExecuteResponse"]["properties"]["output"]["description"] == "Standard output."
    assert (
        paths["/api/v1/execute"]["post"]["summary"]
        == "Runs one piece of code and answers with what it printed"
    )
    put_code = paths["/api/v1/zk/code/{name}"]["put"]
    assert set(put_code["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
        "payload", "language"
    }  # fmt: skip
    assert schemas["ZKPayload"]["properties"]["salt"] == {"type": "string", "contentEncoding": "base64"}
    assert schemas["AuditEntry"]["properties"]["timestamp"] == {"type": "string", "format": "date-time"}
    assert [p["name"] for p in paths["/api/v1/audit"]["get"]["parameters"]] == [
        "limit", "cursor", "action", "since", "until"
    ]  # fmt: skip
    assert schemas["Error"]["required"] == ["code", "message", "details"]
    # Every call that takes a body shows a well-formed one (schemathesis sends it first).
    for path, methods in paths.items():
        for method, operation in methods.items():
            if "requestBody" in operation:
                assert "example" in operation["requestBody"]["content"]["application/json"], (method, path)
    # No internal service or message is described.
    text = json.dumps(DOCUMENT)
    for internal in ["Record", "Resolve", "Claim", "Capabilities", "ExecuteEncrypted", "GetEnvironment"]:
        assert internal not in text, internal


def test_a_server_streaming_method_answers_newline_delimited_json() -> None:
    """The generator handles server-streaming methods generically (application/x-ndjson)."""
    files = list(config._load(config.DESCRIPTOR_SET).file)
    executor = next(file for file in files if file.package == "pythonon.executor.v1")
    streaming = descriptor_pb2.FileDescriptorProto()
    streaming.CopyFrom(executor)
    service = next(s for s in streaming.service if s.name == "ExecutorService")
    method = service.method.add()
    method.CopyFrom(service.method[0])
    method.name, method.server_streaming = "ExecuteStream", True
    method.options.Extensions[config.annotations_pb2.http].post = "/api/v1/execute/stream"
    files[files.index(executor)] = streaming
    spec = openapi.document(files, config.services(), version="0", built_sections=["executor"])
    answer = spec["paths"]["/api/v1/execute/stream"]["post"]["responses"]["200"]["content"]
    assert list(answer) == ["application/x-ndjson"]
    validate(spec)


def test_the_edge_serves_the_document_and_the_page(mesh: Mesh) -> None:
    document = httpx.get(f"{mesh.url}/api/openapi.json")
    assert document.status_code == 200
    assert document.headers["content-type"] == "application/json"
    assert document.json() == DOCUMENT
    page = httpx.get(f"{mesh.url}/docs")
    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert page.text == openapi.REFERENCE_PAGE.read_text()
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-request-id"]
    assert (
        httpx.get(f"{mesh.url}/api/openapi.json?v=1").json() == DOCUMENT
    )  # the query is no part of the path
    head = httpx.head(f"{mesh.url}/docs")
    assert (head.status_code, head.content) == (200, b"")
    refused = httpx.post(f"{mesh.url}/docs", content=b"x")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert refused.json() == {"code": 12, "message": "/docs: only GET", "details": []}


def test_the_docs_page_renders_in_headless_chromium(mesh: Mesh, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make system-packages installs it)")
    dom = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path}", "--dump-dom", f"{mesh.url}/docs",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "<h1>Pyth-On API reference</h1>" in dom
    for path, methods in DOCUMENT["paths"].items():
        for method, operation in methods.items():
            heading = f'<h3><span class="verb {method}">{method.upper()}</span>{path}</h3>'
            assert heading in dom, heading
            assert operation["summary"] in dom
    assert 'id="schema-ExecuteResponse"' in dom


def test_a_header_name_grpc_cannot_carry_is_dropped_not_a_500(mesh: Mesh, api_key: str) -> None:
    """Schemathesis's find: HTTP allows header names that gRPC metadata does not (`%`, a backtick),
    and a service's gRPC server failed the whole call on one (500 "Illegal header key")."""
    for name in ["j%", "a`b", "x|y", "odd!"]:
        for path in ["/api/info", "/api/v1/secrets"]:
            response = httpx.get(f"{mesh.url}{path}", headers={name: "1", "x-api-key": api_key})
            assert response.status_code == 200, (name, path, response.text)
        login = httpx.post(
            f"{mesh.url}/api/login", headers={name: "1"}, json={"email": "no@example.com", "password": "x"}
        )
        assert login.status_code == 401, (name, login.text)


# -- schemathesis ----------------------------------------------------------------------------------

SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
CHECKS = [
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
]


def designed_server_error(case: schemathesis.Case, response: object) -> bool:
    """The 5xx answers that are designed: generate without ANTHROPIC_API_KEY."""
    status = response.status_code  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    return status == 503 and case.path == "/api/v1/generate" and "generation is not configured" in text


@SCHEMA.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_server_error(case: schemathesis.Case, mesh: Mesh, api_key: str) -> None:
    """Bounded: 12 examples per operation (about 250 requests in all)."""
    response = case.call(base_url=mesh.url, headers={"x-api-key": api_key}, timeout=30)
    assert response.status_code < 500 or designed_server_error(case, response), (
        case.method,
        case.formatted_path,
        case.body,
        response.status_code,
        response.text,
    )
    case.validate_response(response, checks=CHECKS)


# -- native gRPC: reflection and health ------------------------------------------------------------


def _edge(mesh: Mesh) -> grpc.Channel:
    return grpc.insecure_channel(mesh.url.removeprefix("http://"))


def test_reflection_lists_and_describes_only_the_public_services(mesh: Mesh) -> None:
    # A user of its own: the fuzzed one's package list may be one that cannot build.
    registered = httpx.post(
        f"{mesh.url}/api/register", json={"email": new_email("grpc"), "password": PASSWORD}
    )
    api_key = registered.json()["apiKey"]
    with _edge(mesh) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        listed = list(database.get_services())
        assert sorted(listed) == sorted([*PUBLIC_SERVICES, "grpc.health.v1.Health"])
        pool = descriptor_pool.DescriptorPool(database)
        for internal in INTERNAL_SERVICES:
            with pytest.raises(KeyError):
                pool.FindServiceByName(internal)
        with pytest.raises(KeyError):
            pool.FindMessageTypeByName("pythonon.executor.v1.ClaimResponse")

        # A call built from reflection alone, as grpcurl makes it, with the key as metadata.
        method = pool.FindServiceByName("pythonon.executor.v1.ExecutorService").methods_by_name["Execute"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        execute = channel.unary_unary(
            "/pythonon.executor.v1.ExecutorService/Execute",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        answer = execute(request_class(code="print(6 * 7)"), metadata=[("x-api-key", api_key)], timeout=30)
        assert (answer.output, answer.exit_code) == ("42\n", 0)
        with pytest.raises(grpc.RpcError) as anonymous:
            execute(request_class(code="print(1)"), timeout=30)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The internal services stay unreachable through the edge, whatever the credential.
        record = channel.unary_unary("/pythonon.audit.v1.AuditRecorderService/Record")
        with pytest.raises(grpc.RpcError) as internal:
            record(b"", metadata=[("x-api-key", api_key)], timeout=10)
        assert internal.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_v1_answers_like_v1alpha(mesh: Mesh) -> None:
    with _edge(mesh) as channel:
        for version in ("v1", "v1alpha"):
            info = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="pythonon.audit.v1.AuditRecorderService"
                ),
            ]
            listing, unknown = list(info(iter(requests), timeout=10))
            names = sorted(service.name for service in listing.list_services_response.service)
            assert names == sorted([*PUBLIC_SERVICES, "grpc.health.v1.Health"]), version
            assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], version


def test_grpc_health_answers_for_the_public_api(mesh: Mesh) -> None:
    with _edge(mesh) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert status("pythonon.executor.v1.ExecutorService") == health_pb2.HealthCheckResponse.SERVING
        # Running but not configured (no ANTHROPIC_API_KEY): not serving, as /health says.
        assert status("pythonon.generator.v1.GeneratorService") == health_pb2.HealthCheckResponse.NOT_SERVING
        for unknown in ["pythonon.audit.v1.AuditRecorderService", "pythonon.system.v1.Nothing"]:
            with pytest.raises(grpc.RpcError) as refused:
                status(unknown)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
