"""Calling a mesh's service straight on its port, as a member of the mesh would: with a
certificate of the mesh's CA (the runner's, by default), the way every service calls another.

Without one (or with a certificate of any other CA) the service refuses the connection in the
TLS handshake: tests/integration/test_mesh_identity.py."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.platform.client import channel_credentials, tls_channel_options
from services.platform.settings import MESH_CA_VARIABLE, MESH_CERT_VARIABLE, MESH_KEY_VARIABLE, MeshTls
from services.runner.layout import RUNNER_IDENTITY
from services.runner.mesh import Mesh
from services.runner.mesh_ca import MeshCA


def mesh_channel(mesh: Mesh, service: str, identity: str = RUNNER_IDENTITY) -> grpc.Channel:
    """A blocking channel to `service`'s own port (bypassing the edge), presenting `identity`'s
    mesh certificate and checking that the server's names `service`."""
    return grpc.secure_channel(
        mesh.service_address(service),
        channel_credentials(mesh.member_tls(identity)),
        options=tls_channel_options(service),
    )


def mesh_identity_files(directory: Path, service: str) -> dict[str, str]:
    """The PYTHONON_MESH_* variables of a service started by hand: a CA of its own in `directory`
    (see caller_channel) and a certificate naming `service`."""
    ca = MeshCA.create()
    (directory / "mesh-ca.key").write_bytes(ca.key_pem)
    issued = ca.issue(service)
    files = {
        MESH_CA_VARIABLE: (directory / "mesh-ca.pem", ca.certificate_pem),
        MESH_CERT_VARIABLE: (directory / f"{service}.pem", issued.certificate_pem),
        MESH_KEY_VARIABLE: (directory / f"{service}.key", issued.key_pem),
    }
    for path, content in files.values():
        path.write_bytes(content)
    return {variable: str(path) for variable, (path, _content) in files.items()}


def caller_channel(directory: Path, service: str, address: str) -> grpc.Channel:
    """A blocking channel to a service started with mesh_identity_files(directory, service), with a
    certificate of the same CA."""
    ca_pem = (directory / "mesh-ca.pem").read_bytes()
    issued = MeshCA.from_pem((directory / "mesh-ca.key").read_bytes(), ca_pem).issue(RUNNER_IDENTITY)
    tls = MeshTls.from_pem(ca_pem, issued.certificate_pem, issued.key_pem)
    return grpc.secure_channel(address, channel_credentials(tls), options=tls_channel_options(service))
