"""Traces leave a service only when OTEL_EXPORTER_OTLP_ENDPOINT is set: a real service process
exports its spans to a collector the test runs, and exports nothing without the variable."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform.identity import generate_private_key_pem, public_key_pem
from tests.mesh_identity import caller_channel, mesh_identity_files


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name", ""), s.name) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture()
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_system_service(tmp_path: Path, otlp_endpoint: str | None) -> None:
    """Start `python -m services.system`, call Info once, stop it with SIGTERM (which flushes)."""
    key = tmp_path / "identity.pub"
    key.write_bytes(public_key_pem(generate_private_key_pem()))
    port = _free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONON_PORT": str(port),
        "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(key),
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # only the shutdown flush exports
        **mesh_identity_files(tmp_path, "system"),
    }
    if otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    service = subprocess.Popen([sys.executable, "-m", "services.system"], env=env, stderr=subprocess.PIPE)
    try:
        with caller_channel(tmp_path, "system", f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            info = system_pb2_grpc.SystemServiceStub(channel).Info(system_pb2.InfoRequest(), timeout=10)
            assert info.name == "Pyth-On"
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=20) == 0
    finally:
        if service.poll() is None:
            service.kill()


def test_spans_are_exported_when_an_endpoint_is_set(collector, tmp_path: Path) -> None:
    servicer, endpoint = collector
    _run_system_service(tmp_path, endpoint)
    deadline = time.monotonic() + 5
    while not servicer.spans and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("pythonon-system", "/pythonon.system.v1.SystemService/Info") in servicer.spans


def test_nothing_is_exported_without_an_endpoint(collector, tmp_path: Path, monkeypatch) -> None:
    servicer, endpoint = collector
    _run_system_service(tmp_path, None)
    time.sleep(0.5)
    assert servicer.spans == []
