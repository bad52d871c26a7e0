"""The plaintext health port the Kubernetes manifests probe (PYTHONON_HEALTH_PORT): a real service
process answers grpc.health.v1 there without a certificate, and nothing else; its mesh port still
refuses plaintext; without the setting there is no such port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runner.migrate import migrate_service
from tests.identity_keys import make_keys
from tests.mesh_identity import caller_channel, mesh_identity_files

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(channel: grpc.Channel) -> str:
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined]  # a grpc.Call
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _reflection(channel: grpc.Channel) -> str:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined]
    return "OK"


def _start_audit(tmp_path: Path, health_port: int | None) -> tuple[subprocess.Popen[bytes], int]:
    database = f"sqlite:///{tmp_path / 'audit.db'}"
    migrate_service("audit", database)
    port = _free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONON_PORT": str(port),
        "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(make_keys(tmp_path).public_key_file),
        "PYTHONON_AUDIT_DATABASE_URL": database,
        **mesh_identity_files(tmp_path, "audit"),
    }
    if health_port is not None:
        env["PYTHONON_HEALTH_PORT"] = str(health_port)
    process = subprocess.Popen([sys.executable, "-m", "services.audit"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with caller_channel(tmp_path, "audit", f"127.0.0.1:{port}") as channel:
            if _health(channel) == "SERVING":
                return process, port
        assert process.poll() is None, "the audit service exited"
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the audit service did not start")


def test_the_health_port_answers_health_in_plaintext_and_nothing_else(tmp_path: Path) -> None:
    health_port = _free_port()
    process, port = _start_audit(tmp_path, health_port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            assert _health(channel) == "SERVING"
            assert _reflection(channel) == "UNIMPLEMENTED"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _health(channel) == "UNAVAILABLE"  # the mesh port: mutual TLS only
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        assert _health(channel) == "UNAVAILABLE"  # stopped with the service


def test_without_the_setting_there_is_no_health_port(tmp_path: Path) -> None:
    process, port = _start_audit(tmp_path, None)
    try:
        listening = subprocess.run(
            ["ss", "-Htlnp"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        ports = {line.split()[3].rsplit(":", 1)[1] for line in listening if f"pid={process.pid}," in line}
        assert ports == {str(port)}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
