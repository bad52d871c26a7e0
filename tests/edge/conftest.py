"""Fixtures: a real Envoy with the rendered edge config, in front of in-process gRPC doubles.

The doubles record what reaches them (method, metadata, request) so that tests can assert what
the edge forwarded, and a test can script any method's answer with ``double.answer(name, fn)``.
Everything tests need is reached through fixtures, so nothing here is imported by module name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from edge import config
from services.platform import service_graph

IDENTITY = "signed-assertion-for-user-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Call:
    """One call that reached a double."""

    method: str
    metadata: dict[str, str]
    request: object


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, context: grpc.ServicerContext, request: object) -> None:
        with self.lock:
            self.calls.append(Call(method, dict(context.invocation_metadata()), request))

    def only(self, method: str) -> Call:
        matching = [c for c in self.calls if c.method == method]
        assert len(matching) == 1, f"expected one {method} call, got {self.calls!r}"
        return matching[0]


def allow(request: external_auth_pb2.CheckRequest, context=None) -> external_auth_pb2.CheckResponse:
    """The Check answer of a valid credential: OK plus the identity assertion header."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=service_graph.IDENTITY_HEADER, value=IDENTITY),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        ),
    )


def deny(
    http_status: int, grpc_code: int, message: str, headers: dict[str, str] | None = None
) -> Callable[..., external_auth_pb2.CheckResponse]:
    """A Check answer that denies with a google.rpc.Status JSON body, as the auth service does."""
    body = json.dumps({"code": grpc_code, "message": message, "details": []})
    extra = [("content-type", "application/json"), *(headers or {}).items()]

    def check(request: external_auth_pb2.CheckRequest, context=None) -> external_auth_pb2.CheckResponse:
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=grpc_code),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status),
                body=body,
                headers=[
                    base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in extra
                ],
            ),
        )

    return check


class _Double:
    """Records every call; a test can replace the answer of a method with ``answer(name, fn)``."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self._answers: dict[str, Callable] = {}

    def answer(self, method: str, fn: Callable) -> None:
        """Answer ``method`` with ``fn(request, context)`` instead of the default."""
        self._answers[method] = fn

    def reset(self) -> None:
        self.recorder.calls.clear()
        self._answers.clear()

    def _call(self, method: str, request, context, default: Callable):
        self.recorder.record(method, context, request)
        return self._answers.get(method, default)(request, context)


class AuthDouble(_Double, external_auth_pb2_grpc.AuthorizationServicer, auth_pb2_grpc.AuthServiceServicer):
    """Stands in for the auth service: the ext_authz Check plus AuthService."""

    identity = IDENTITY

    def deny(self, http_status: int, grpc_code: int, message: str, headers: dict[str, str] | None = None):
        """Deny every Check from now on, as the auth service denies (see ``deny``)."""
        self.answer("Check", deny(http_status, grpc_code, message, headers))

    def allow_without_identity(self) -> None:
        """Allow every Check from now on, without adding an identity header."""
        self.answer(
            "Check", lambda request, context: external_auth_pb2.CheckResponse(status=status_pb2.Status())
        )

    def Check(self, request, context):  # noqa: N802 - gRPC method names
        return self._call("Check", request, context, allow)

    def Register(self, request, context):  # noqa: N802
        def created(request, context):
            # The edge turns this header into the REST response's status.
            context.send_initial_metadata(((service_graph.HTTP_STATUS_HEADER, "201"),))
            return auth_pb2.AuthResponse(
                token="jwt",
                refresh_token="refresh",
                api_key="key",
                expires_in=900,
                user=auth_pb2.UserInfo(
                    id="u1", email=request.email, created_at=timestamp_pb2.Timestamp(seconds=1_700_000_000)
                ),
            )

        return self._call("Register", request, context, created)

    def Login(self, request, context):  # noqa: N802
        def unauthenticated(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong email or password")

        return self._call("Login", request, context, unauthenticated)

    def Verify(self, request, context):  # noqa: N802
        def echo_identity(request, context):
            identity = dict(context.invocation_metadata()).get(service_graph.IDENTITY_HEADER, "")
            return auth_pb2.VerifyResponse(valid=True, id=identity)

        return self._call("Verify", request, context, echo_identity)


class SystemDouble(_Double, system_pb2_grpc.SystemServiceServicer):
    """Stands in for the system service (which answers UNIMPLEMENTED for the unbuilt sections)."""

    def Health(self, request, context):  # noqa: N802
        def ok(request, context):
            return system_pb2.HealthResponse(status="ok", version="0.1.0", services={"auth": "ok"})

        return self._call("Health", request, context, ok)

    def Info(self, request, context):  # noqa: N802
        def info(request, context):
            return system_pb2.InfoResponse(
                name="pyth-on",
                version="0.1.0",
                languages=["python"],
                limits=system_pb2.Limits(timeout_default_seconds=10, network=False),
            )

        return self._call("Info", request, context, info)


def serve(register: Callable[[grpc.Server], None]) -> tuple[grpc.Server, int]:
    """A started gRPC server on a free loopback port, with ``register(server)`` applied."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@dataclass
class Edge:
    """One running Envoy."""

    url: str
    port: int
    admin_socket: Path
    process: subprocess.Popen
    log: Path
    config_path: Path


@dataclass
class Mesh:
    """The auth and system doubles and the addresses ("host:port") they serve on."""

    auth: AuthDouble
    system: SystemDouble
    addresses: dict[str, str]


@pytest.fixture(scope="session")
def mesh() -> Iterator[Mesh]:
    """The auth and system doubles, serving for the whole session."""
    auth, system = AuthDouble(), SystemDouble()

    def register_auth(server) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(auth, server)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, server)

    auth_server, auth_port = serve(register_auth)
    system_server, system_port = serve(
        lambda server: system_pb2_grpc.add_SystemServiceServicer_to_server(system, server)
    )
    yield Mesh(auth, system, {"auth": f"127.0.0.1:{auth_port}", "system": f"127.0.0.1:{system_port}"})
    auth_server.stop(grace=None)
    system_server.stop(grace=None)


@pytest.fixture()
def doubles(mesh: Mesh) -> Mesh:
    """The doubles with their default answers and nothing recorded yet."""
    mesh.auth.reset()
    mesh.system.reset()
    return mesh


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM Envoy's process group, SIGKILL if it does not exit within 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def start_edge(tmp_path_factory) -> Iterator[Callable[..., Edge]]:
    """Start a real Envoy with ``config.render(upstreams=..., **kwargs)``; all are stopped at the end."""
    started: list[subprocess.Popen] = []

    def start(upstreams: dict[str, str], **kwargs) -> Edge:
        directory = tmp_path_factory.mktemp("edge")
        port, admin_socket = free_port(), directory / "admin.sock"
        path = config.write_config(
            directory / "envoy.json",
            listen_port=port,
            admin_socket=admin_socket,
            upstreams=upstreams,
            **kwargs,
        )
        admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(admin_socket)), timeout=1)
        log = directory / "envoy.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    config.envoy_binary(),
                    "--config-path",
                    str(path),
                    # Several Envoys may run at once (and the runner's too): no shared memory.
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so that cleanup reaches all of it
            )
        started.append(process)
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}:\n{log.read_text()}")
            try:
                if admin.get("http://envoy/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                _stop(process)
                raise RuntimeError(f"envoy not ready within 30 s:\n{log.read_text()}")
            time.sleep(0.05)
        admin.close()
        return Edge(f"http://127.0.0.1:{port}", port, admin_socket, process, log, path)

    yield start
    for process in started:
        _stop(process)


@pytest.fixture(scope="session")
def dead_address() -> Iterator[str]:
    """A loopback address that refuses connections: bound but never listening, so no one else takes it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture(scope="session")
def edge(mesh: Mesh, start_edge, dead_address: str) -> Edge:
    """The edge in front of the doubles: executor (and the rest) not built, secrets built but down."""
    return start_edge({**mesh.addresses, "secrets": dead_address})


@pytest.fixture()
def client(edge: Edge, doubles: Mesh) -> Iterator[httpx.Client]:
    """An HTTP/1.1 client of the edge, as curl would be; the doubles are fresh for each test."""
    with httpx.Client(base_url=edge.url, timeout=10) as c:
        yield c
