"""The executor's sandbox endpoint for the kubernetes backend: SandboxRunnerService, on a port of
its own (50052 in k8s/), plaintext, reached only by sandbox pods (the namespace's NetworkPolicy).
A thin servicer: the backend decides what a token is worth; this maps its refusals to gRPC codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor.sandbox.pod_runner import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from services.executor.sandbox.kubernetes import KubernetesBackend

# Runners waiting in Claim send keepalive pings, so that a runner notices when its executor is gone
# (and its pod ends) instead of waiting on a dead connection.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]


class SandboxRunnerServicer(executor_pb2_grpc.SandboxRunnerServiceServicer):
    def __init__(self, backend: KubernetesBackend) -> None:
        self._backend = backend

    async def Claim(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.ClaimRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ClaimResponse:
        from services.executor.sandbox.kubernetes import ClaimRefused, Retired

        try:
            spec, report_token = await self._backend.claim(request.claim_token, context.peer())
        except ClaimRefused as refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(refused))
        except Retired:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "retired: no run for this pod")
        limits = spec.limits
        return executor_pb2.ClaimResponse(
            language=spec.language,
            code=spec.code,
            stdin=spec.stdin,
            env=dict(spec.env),
            files=dict(spec.files),
            private_input=spec.private_input,
            limits=executor_pb2.RunLimits(
                timeout_seconds=limits.timeout_seconds,
                memory_bytes=limits.memory_bytes,
                processes=limits.processes,
                output_bytes=limits.output_bytes,
                file_bytes=limits.file_bytes,
                tmp_bytes=limits.tmp_bytes,
                cpus=limits.cpus,
            ),
            report_token=report_token,
        )

    async def Report(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.ReportRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ReportResponse:
        from services.executor.sandbox.kubernetes import ClaimRefused, Report

        try:
            self._backend.report(
                request.report_token,
                Report(
                    stdout=request.stdout,
                    stderr=request.stderr,
                    exit_code=request.exit_code,
                    duration_seconds=request.duration_seconds,
                    timed_out=request.timed_out,
                    overflowed=request.overflowed,
                ),
            )
        except ClaimRefused as refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(refused))
        return executor_pb2.ReportResponse()


async def serve(backend: KubernetesBackend, address: str) -> tuple[grpc.aio.Server, int]:
    """Start the endpoint on `address` (host:port); the server and the port it got."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    executor_pb2_grpc.add_SandboxRunnerServiceServicer_to_server(SandboxRunnerServicer(backend), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"the sandbox endpoint cannot listen on {address}")
    await server.start()
    return server, port
