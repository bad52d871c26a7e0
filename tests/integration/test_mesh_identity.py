"""Internal calls carry a mesh identity (issue 10, item 2): a service's own port answers only a
caller with a certificate of the mesh's CA, so an outside process on the host can neither mint an
identity through auth's Check, nor forge an audit entry, nor read secret values, nor skip the
edge's rate limits by calling auth directly. Envoy's admin interface has no TCP port."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import httpx
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.platform import service_graph
from services.platform.client import channel_credentials, tls_channel_options
from services.platform.identity import Identity, IdentitySigner
from services.platform.service_graph import IDENTITY_HEADER
from services.runner.mesh import EDGE, Mesh
from tests.integration.conftest import PASSWORD
from tests.mesh_identity import mesh_channel

ROOT = Path(__file__).resolve().parents[2]
CALLS = (
    "envoy.service.auth.v3.Authorization/Check",
    "AuditRecorderService/Record",
    "SecretsResolverService/ResolveSecrets",
    "AuthService/Login",
)
WAYS = ("plaintext", "tls without a client certificate", "a certificate of another CA")


def _from_outside(plan: dict) -> dict[str, dict[str, str]]:
    """Run the attempts in a separate process that holds no mesh certificate."""
    ran = subprocess.run(
        [sys.executable, "-m", "tests.integration.outside_caller"],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def _check_request(api_key: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET", path="/api/v1/secrets", headers={"x-api-key": api_key}
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def test_direct_calls_from_an_outside_process_are_refused_and_change_nothing(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    key = {"x-api-key": user["apiKey"]}
    stored = client.put("/api/v1/secrets/API_TOKEN", json={"value": "s3cr3t-value"}, headers=key)
    assert stored.status_code == 200, stored.text
    # Even a genuine identity assertion does not help a caller without a mesh certificate.
    assertion = IdentitySigner(mesh.identity_key_path.read_bytes()).sign(
        Identity(user["user"]["id"], user["user"]["email"])
    )
    resource = f"user/{user['user']['id']}"
    plan = {
        "addresses": {name: mesh.service_address(name) for name in ("auth", "audit", "secrets")},
        "mesh_ca_file": str(mesh.layout.mesh_ca_certificate),
        "api_key": user["apiKey"],
        "assertion": assertion,
        "record_id": str(uuid.uuid4()),
        "resource": resource,
        "email": user["user"]["email"],
        "password": PASSWORD,
    }
    before = client.get("/api/v1/audit", headers=key).json()["entries"]

    outcomes = _from_outside(plan)

    # Refused in the TLS handshake: no call reached a servicer.
    assert outcomes == {call: dict.fromkeys(WAYS, "UNAVAILABLE") for call in CALLS}
    after = client.get("/api/v1/audit", headers=key).json()["entries"]
    assert after == before  # no forged auth.login, and the refused Login left no entry either
    assert "s3cr3t-value" not in json.dumps(outcomes)

    # The same Check with the edge's certificate is answered: the refusal above is the certificate's.
    with mesh_channel(mesh, "auth", identity=service_graph.EDGE) as channel:
        answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            _check_request(user["apiKey"]), timeout=10
        )
    assert answer.status.code == 0
    assert IDENTITY_HEADER in {option.header.key for option in answer.ok_response.headers}


def test_a_caller_accepts_only_the_service_it_meant_to_call(mesh: Mesh) -> None:
    # A mesh certificate on the wrong port (or a process that took a service's port with another
    # member's certificate) is refused by the caller: the server's certificate must name the service.
    credentials = channel_credentials(mesh.member_tls())
    with grpc.secure_channel(
        mesh.service_address("auth"), credentials, options=tls_channel_options("audit")
    ) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]  # a grpc.Call
        else:
            raise AssertionError("auth's certificate was accepted for the audit service")
    with mesh_channel(mesh, "audit") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _listening_tcp_ports(pids: set[int]) -> set[int]:
    """The TCP ports the processes `pids` listen on (IPv4 and IPv6), from /proc."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def _process_group(leader: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == leader:
                    members.add(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def test_envoys_admin_is_a_private_unix_socket_and_on_no_tcp_port(mesh: Mesh) -> None:
    envoy = _process_group(mesh.pids[EDGE])
    assert envoy
    # The edge's port is Envoy's only TCP port: no admin on any loopback port.
    assert _listening_tcp_ports(envoy) == {mesh.ports.edge}
    # The edge's own port does not serve the admin's pages either.
    assert httpx.get(f"{mesh.url}/server_info", timeout=10).status_code == 404

    socket_path = mesh.envoy_admin_socket
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=10) as admin:
        info = admin.get("http://envoy/server_info")
    assert info.status_code == 200 and info.json()["state"] == "LIVE"
