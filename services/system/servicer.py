"""pythonon.system.v1.SystemService: reads the request, asks the logic, builds the response."""

from __future__ import annotations

import grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform.rest import set_http_status
from services.system.capabilities import ExecutorCapabilities
from services.system.health import HealthChecker
from services.system.info import DeploymentInfo

SERVICE_UNAVAILABLE = 503


class SystemServicer(system_pb2_grpc.SystemServiceServicer):
    def __init__(self, health: HealthChecker, info: DeploymentInfo, executor: ExecutorCapabilities) -> None:
        self._health = health
        self._info = info
        self._executor = executor

    async def Health(  # noqa: N802 (gRPC method name)
        self, request: system_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> system_pb2.HealthResponse:
        report = await self._health.check()
        if report.degraded:
            # The gRPC status stays OK so that REST clients still get the body that says what is down.
            await set_http_status(context, SERVICE_UNAVAILABLE)
        return system_pb2.HealthResponse(
            status=report.status,
            version=report.version,
            services=dict(report.services),
            uptime_seconds=report.uptime_seconds,
        )

    async def Info(  # noqa: N802 (gRPC method name)
        self, request: system_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> system_pb2.InfoResponse:
        info, limits = self._info, self._info.limits
        executor = await self._executor.get()
        return system_pb2.InfoResponse(
            name=info.name,
            version=info.version,
            languages=list(executor.languages),
            limits=system_pb2.Limits(
                timeout_default_seconds=limits.timeout_default_seconds,
                timeout_max_seconds=limits.timeout_max_seconds,
                memory_mib=limits.memory_mib,
                processes=limits.processes,
                output_bytes=limits.output_bytes,
                file_bytes=limits.file_bytes,
                tmp_bytes=limits.tmp_bytes,
                code_bytes=limits.code_bytes,
                network=limits.network,
            ),
            features=dict(info.features),
            sandbox=executor.sandbox,
            enforced_limits=dict(executor.enforced_limits),
            runtimes=[
                system_pb2.LanguageRuntime(
                    language=runtime.language, version=runtime.version, aliases=list(runtime.aliases)
                )
                for runtime in executor.runtimes
            ],
        )
