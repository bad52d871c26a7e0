"""The mesh's mutual TLS in-process: the bootstrap's server refuses callers without a certificate of
the mesh CA and connect() reaches it with one; the settings refuse files that would only fail later,
in every handshake; the edge's clusters demand each service's name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge import config as edge_config
from services.platform.bootstrap import ServiceParts, start_server
from services.platform.client import connect
from services.platform.errors import Unavailable
from services.platform.settings import (
    MESH_CA_VARIABLE,
    MESH_CERT_VARIABLE,
    MESH_KEY_VARIABLE,
    Environment,
    MeshTls,
    ServerSettings,
    SettingsError,
    ephemeral_server_settings,
)
from services.runner.mesh_ca import MeshCA
from tests.identity_keys import make_keys


def _member(ca: MeshCA, name: str) -> MeshTls:
    issued = ca.issue(name)
    return MeshTls.from_pem(ca.certificate_pem, issued.certificate_pem, issued.key_pem)


def _health(address: str, credentials: grpc.ChannelCredentials | None, name: str = "audit") -> str:
    """The status name the health check ended with ("SERVING" when it went through)."""
    options = (("grpc.ssl_target_name_override", name),)
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name  # type: ignore[attr-defined]  # a grpc.Call
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_the_server_answers_only_a_member_of_its_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = make_keys(tmp_path)
    ca, stranger_ca = MeshCA.create(), MeshCA.create()
    stranger = stranger_ca.issue("runner")
    runner = ca.issue("runner")
    for variable, name, content in (
        (MESH_CA_VARIABLE, "ca.pem", ca.certificate_pem),
        (MESH_CERT_VARIABLE, "runner.pem", runner.certificate_pem),
        (MESH_KEY_VARIABLE, "runner.key", runner.key_pem),
    ):
        (tmp_path / name).write_bytes(content)
        monkeypatch.setenv(variable, str(tmp_path / name))

    async def scenario() -> dict[str, str]:
        settings = ephemeral_server_settings("audit", keys.public_key_file, _member(ca, "audit"))
        server, _health_servicer, port = await start_server(settings, ServiceParts(servicers=[]))
        address = f"127.0.0.1:{port}"
        try:
            seen = {
                way: await asyncio.to_thread(_health, address, credentials)
                for way, credentials in {
                    "plaintext": None,
                    "no client certificate": grpc.ssl_channel_credentials(ca.certificate_pem),
                    "another CA's certificate": grpc.ssl_channel_credentials(
                        ca.certificate_pem, stranger.key_pem, stranger.certificate_pem
                    ),
                    "a member's certificate": grpc.ssl_channel_credentials(
                        ca.certificate_pem, runner.key_pem, runner.certificate_pem
                    ),
                }.items()
            }
            # connect() presents the PYTHONON_MESH_* identity and checks the server's name.
            async with connect("audit", address) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                seen["connect()"] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            async with connect("secrets", address) as channel:  # the audit server is not "secrets"
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                    seen["connect() to the wrong name"] = "SERVING"
                except Unavailable:
                    seen["connect() to the wrong name"] = "UNAVAILABLE"
            return seen
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == {
        "plaintext": "UNAVAILABLE",
        "no client certificate": "UNAVAILABLE",
        "another CA's certificate": "UNAVAILABLE",
        "a member's certificate": "SERVING",
        "connect()": "SERVING",
        "connect() to the wrong name": "UNAVAILABLE",
    }


def _files(directory: Path, ca: MeshCA, certificate: bytes, key: bytes) -> dict[str, str]:
    paths = {MESH_CA_VARIABLE: "ca.pem", MESH_CERT_VARIABLE: "leaf.pem", MESH_KEY_VARIABLE: "leaf.key"}
    for variable, content in zip(paths, (ca.certificate_pem, certificate, key), strict=True):
        (directory / paths[variable]).write_bytes(content)
    return {variable: str(directory / name) for variable, name in paths.items()}


def test_mesh_files_that_would_fail_every_handshake_are_refused_at_start_up(tmp_path: Path) -> None:
    ca, other = MeshCA.create(), MeshCA.create()
    audit, foreign, second = ca.issue("audit"), other.issue("audit"), ca.issue("audit")
    cases = {
        "the certificate is not signed by the mesh CA": (foreign.certificate_pem, foreign.key_pem),
        "the key is not the certificate's": (audit.certificate_pem, second.key_pem),
        "the CA and the certificate must be PEM certificates": (b"not a certificate", audit.key_pem),
        "the key must be an unencrypted PEM private key": (audit.certificate_pem, b"nope"),
    }
    for complaint, (certificate, key) in cases.items():
        with pytest.raises(SettingsError, match=complaint):
            MeshTls.load(Environment(_files(tmp_path, ca, certificate, key)))
    good = _files(tmp_path, ca, audit.certificate_pem, audit.key_pem)
    assert MeshTls.load(Environment(good)).name == "audit"
    with pytest.raises(SettingsError, match="PYTHONON_MESH_CA_FILE is required but not set"):
        MeshTls.load(Environment({}))
    assert MeshTls.load_if_given(Environment({})) is None
    with pytest.raises(SettingsError, match="PYTHONON_MESH_CERT_FILE is required"):
        MeshTls.load_if_given(Environment({MESH_CA_VARIABLE: good[MESH_CA_VARIABLE]}))
    # A service refuses another member's certificate as its own.
    key_file = make_keys(tmp_path).public_key_file
    environment = {**good, "PYTHONON_PORT": "0", "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(key_file)}
    with pytest.raises(SettingsError, match="PYTHONON_MESH_CERT_FILE names 'audit', not the secrets service"):
        ServerSettings.load("secrets", Environment(environment))
    assert ServerSettings.load("audit", Environment(environment)).mesh_tls == MeshTls.load(Environment(good))


def test_every_edge_cluster_is_mutual_tls_demanding_its_services_name_and_admin_has_no_port() -> None:
    tls = edge_config.UpstreamTls(Path("/d/ca.pem"), Path("/d/edge.pem"), Path("/d/edge.key"))
    upstreams = {"auth": "127.0.0.1:1", "system": "127.0.0.1:2", "audit": "audit.pythonon.svc:50051"}
    rendered = edge_config.render(
        listen_port=8080, upstreams=upstreams, upstream_tls=tls, admin_socket="/d/envoy-admin.sock"
    )
    clusters = {cluster["name"]: cluster for cluster in rendered["static_resources"]["clusters"]}
    assert len(clusters) == len(upstreams)
    for section in upstreams:
        context = clusters[edge_config._cluster_name(section)]["transport_socket"]["typed_config"]
        assert context["sni"] == section
        common = context["common_tls_context"]
        assert common["tls_certificates"] == [
            {"certificate_chain": {"filename": "/d/edge.pem"}, "private_key": {"filename": "/d/edge.key"}}
        ]
        assert common["validation_context"] == {
            "trusted_ca": {"filename": "/d/ca.pem"},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": section}}],
        }
    assert rendered["admin"] == {"address": {"pipe": {"path": "/d/envoy-admin.sock", "mode": 0o600}}}
    assert "admin" not in edge_config.render(listen_port=8080, upstreams=upstreams)
