"""Fixtures: a real OpenBao on a free loopback port (started, initialised and unsealed by the runner's
own code), a recording stand-in for the audit service, and the secrets service in-process on port 0.

The audit double records what reaches it and can be told to fail, as the real one can; the secrets
service under test is built exactly as `python -m services.secrets` builds it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import hvac
import jwt
import pytest
from google.protobuf import json_format
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc
from pythonon.secrets.v1 import secrets_pb2_grpc

from services.platform.bootstrap import start_server
from services.platform.identity import Identity
from services.platform.service_graph import IDENTITY_HEADER
from services.platform.settings import ephemeral_server_settings
from services.runner import openbao
from services.secrets.__main__ import build
from services.secrets.settings import SecretsSettings, VaultSettings
from tests.identity_keys import Keys, make_keys


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OpenBao:
    """A running OpenBao: its address, its files (init record, service token), its process."""

    address: str
    files: openbao.OpenBaoFiles
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def root_token(self) -> str:
        return json.loads(self.files.init_file.read_text())["root_token"]

    def root_client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token, timeout=5)

    def seal(self) -> None:
        self.root_client().sys.seal()

    def unseal(self) -> None:
        key = json.loads(self.files.init_file.read_text())["keys_base64"][0]
        hvac.Client(url=self.address, timeout=5).sys.submit_unseal_key(key)
        deadline = time.monotonic() + 20
        while openbao.health_status(self.address) != 200:
            assert time.monotonic() < deadline, "OpenBao did not become active after unsealing"
            time.sleep(0.1)


def start_openbao(data_dir: Path) -> OpenBao:
    """Start OpenBao on `data_dir` as the runner does (own process group) and prepare it."""
    files = openbao.OpenBaoFiles.at(data_dir)
    (files.root / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
    port = free_port()
    openbao.write_config(files, port)
    log_path = files.root / "openbao.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            openbao.server_argv(files),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(files.root)},
        )
    running = OpenBao(f"http://127.0.0.1:{port}", files, process, log_path)

    def check_alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")

    try:
        openbao.prepare(running.address, files, deadline=time.monotonic() + 30, check_alive=check_alive)
    except BaseException:
        stop_openbao(running)
        raise
    return running


def stop_openbao(running: OpenBao) -> None:
    if running.process.poll() is None:
        os.killpg(running.process.pid, signal.SIGTERM)
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait()


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    running = start_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        yield running
    finally:
        stop_openbao(running)


# -- identity ----------------------------------------------------------------------------------------


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


_users = iter(range(1, 1_000_000))


def new_user() -> Identity:
    number = next(_users)
    return Identity(
        user_id=f"user-{number}-{os.getpid()}-{time.monotonic_ns()}", email=f"u{number}@example.com"
    )


# -- the audit service's stand-in ------------------------------------------------------------------


@dataclass
class AuditDouble(audit_pb2_grpc.AuditRecorderServiceServicer):
    """Records every Record call (with the user its assertion names); fails on demand."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failing: bool = False

    async def Record(  # noqa: N802
        self, request: audit_pb2.RecordRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordResponse:
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit store down")
        metadata = dict(context.invocation_metadata() or ())
        claims = jwt.decode(metadata[IDENTITY_HEADER], options={"verify_signature": False})
        self.records.append(
            {
                "user": claims["sub"],
                "action": request.action,
                "resource": request.resource,
                "outcome": request.outcome,
                "details": json_format.MessageToDict(request.details),
                "raw": request.SerializeToString(),
            }
        )
        return audit_pb2.RecordResponse(entry=audit_pb2.AuditEntry(action=request.action), created=True)

    def of(self, user: Identity) -> list[tuple[str, str, dict[str, Any]]]:
        return [(r["action"], r["resource"], r["details"]) for r in self.records if r["user"] == user.user_id]


@asynccontextmanager
async def audit_double() -> AsyncIterator[tuple[AuditDouble, str]]:
    double = AuditDouble()
    server = grpc.aio.server()
    audit_pb2_grpc.add_AuditRecorderServiceServicer_to_server(double, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield double, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


# -- the secrets service ---------------------------------------------------------------------------


def vault_settings(bao: OpenBao, **overrides: Any) -> VaultSettings:
    settings = VaultSettings(
        address=bao.address,
        token_file=bao.files.service_token,
        approle=None,
        mount="secret",
        path_prefix="pythonon/users",
        ca_file=None,
        namespace=None,
        timeout_seconds=3.0,
        renew_interval_seconds=600,
    )
    return replace(settings, **overrides)


@dataclass
class Service:
    channel: grpc.aio.Channel
    audit: AuditDouble
    keys: Keys

    @property
    def public(self) -> secrets_pb2_grpc.SecretsServiceStub:
        return secrets_pb2_grpc.SecretsServiceStub(self.channel)

    @property
    def resolver(self) -> secrets_pb2_grpc.SecretsResolverServiceStub:
        return secrets_pb2_grpc.SecretsResolverServiceStub(self.channel)

    def as_user(self, user: Identity) -> tuple[tuple[str, str]]:
        return self.keys.metadata(user)


@asynccontextmanager
async def secrets_service(
    keys: Keys,
    vault: VaultSettings,
    *,
    max_value_bytes: int = 64 * 1024,
    max_secrets_per_user: int = 100,
    user_markers_dir: Path | None = None,
) -> AsyncIterator[Service]:
    """The secrets service as `python -m services.secrets` builds it, on port 0."""
    async with audit_double() as (double, audit_address):
        server_settings = ephemeral_server_settings("secrets", keys.public_key_file)
        settings = SecretsSettings(
            vault=vault,
            audit_address=audit_address,
            max_value_bytes=max_value_bytes,
            max_secrets_per_user=max_secrets_per_user,
            user_markers_dir=user_markers_dir,
        )
        parts = await build(server_settings, settings)
        server, _health, port = await start_server(server_settings, parts)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Service(channel, double, keys)
        finally:
            await server.stop(None)
            for close in parts.on_stop:
                await close()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)
