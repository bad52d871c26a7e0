"""An outside process on the mesh's host trying the direct calls of issue 10: run as
`python -m tests.integration.outside_caller` with a JSON plan on stdin, it prints, as JSON, the
gRPC status each attempt ended with ("OK" when a call went through).

Every call is tried three ways: plaintext; TLS trusting the mesh's CA (its certificate is not
secret) but without a client certificate; TLS with a client certificate of a CA of its own that
names the edge (a forged name). It never reads the mesh's keys: it is what any local user can do."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.runner.mesh_ca import MeshCA

TIMEOUT_SECONDS = 5


def _channels(address: str, service: str, mesh_ca_pem: bytes) -> dict[str, grpc.Channel]:
    own_ca = MeshCA.create()
    forged = own_ca.issue("edge")
    name = (("grpc.ssl_target_name_override", service),)
    return {
        "plaintext": grpc.insecure_channel(address),
        "tls without a client certificate": grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=mesh_ca_pem), options=name
        ),
        "a certificate of another CA": grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(
                root_certificates=mesh_ca_pem,
                private_key=forged.key_pem,
                certificate_chain=forged.certificate_pem,
            ),
            options=name,
        ),
    }


def _attempts(plan: dict[str, Any]) -> dict[str, tuple[str, Callable[[grpc.Channel], Any]]]:
    """call name → (service, the call on a channel to it)."""
    identity = [("x-pythonon-identity", plan["assertion"])]

    def check(channel: grpc.Channel) -> Any:
        http = attribute_context_pb2.AttributeContext.HttpRequest(
            method="GET",
            path="/api/v1/secrets",
            headers={"x-api-key": plan["api_key"], "x-pythonon-client-ip": "203.0.113.9"},
        )
        request = external_auth_pb2.CheckRequest(
            attributes=attribute_context_pb2.AttributeContext(
                request=attribute_context_pb2.AttributeContext.Request(http=http),
                source=attribute_context_pb2.AttributeContext.Peer(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address="203.0.113.9", port_value=1)
                    )
                ),
            )
        )
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=TIMEOUT_SECONDS)

    def record(channel: grpc.Channel) -> Any:
        details = struct_pb2.Struct()
        details.update({"forged": True})
        request = audit_pb2.RecordRequest(
            record_id=plan["record_id"],
            action="auth.login",
            resource=plan["resource"],
            outcome="success",
            client_ip="203.0.113.9",
            details=details,
        )
        return audit_pb2_grpc.AuditRecorderServiceStub(channel).Record(
            request, metadata=identity, timeout=TIMEOUT_SECONDS
        )

    def resolve(channel: grpc.Channel) -> Any:
        return secrets_pb2_grpc.SecretsResolverServiceStub(channel).ResolveSecrets(
            secrets_pb2.ResolveSecretsRequest(all=True), metadata=identity, timeout=TIMEOUT_SECONDS
        )

    def login(channel: grpc.Channel) -> Any:
        return auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.AuthRequest(email=plan["email"], password=plan["password"]), timeout=TIMEOUT_SECONDS
        )

    return {
        "envoy.service.auth.v3.Authorization/Check": ("auth", check),
        "AuditRecorderService/Record": ("audit", record),
        "SecretsResolverService/ResolveSecrets": ("secrets", resolve),
        "AuthService/Login": ("auth", login),
    }


def main() -> None:
    plan = json.load(sys.stdin)
    mesh_ca_pem = Path(plan["mesh_ca_file"]).read_bytes()
    outcomes: dict[str, dict[str, str]] = {}
    for call, (service, attempt) in _attempts(plan).items():
        outcomes[call] = {}
        for way, channel in _channels(plan["addresses"][service], service, mesh_ca_pem).items():
            with channel:
                try:
                    attempt(channel)
                    outcomes[call][way] = "OK"
                except grpc.RpcError as error:
                    outcomes[call][way] = error.code().name  # type: ignore[attr-defined]  # a grpc.Call
    json.dump(outcomes, sys.stdout)


if __name__ == "__main__":
    main()
