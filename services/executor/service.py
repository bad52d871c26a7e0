"""The executor service's parts, wired for the shared bootstrap (`python -m services.executor` runs it)."""

from __future__ import annotations

from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor import settings as executor_settings
from services.executor.execution import ExecutionPolicy, Executions
from services.executor.packages_client import PackagesClient
from services.executor.sandbox import create_backend, reap_leftovers
from services.executor.secrets_client import SecretsClient
from services.executor.servicer import CapabilitiesServicer, EncryptedExecutorServicer, ExecutorServicer
from services.executor.settings import ExecutorSettings
from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer
from services.platform.settings import ServerSettings
from services.platform.user_markers import UserMarkers


async def build(server: ServerSettings, settings: ExecutorSettings) -> ServiceParts:
    """Wire the executor's parts; the warm pool is filled before the server reports SERVING."""
    # A predecessor that was killed could not clean up after itself: its leftovers go first.
    reap_leftovers(settings.backend, settings.backend_options)
    backend = create_backend(settings.backend, **settings.backend_options)
    await backend.start()
    secrets = SecretsClient(settings.secrets_address)
    audit = AuditClient(settings.audit_address)
    policy = ExecutionPolicy(
        default_limits=settings.default_limits,
        max_timeout_seconds=settings.max_timeout_seconds,
        max_code_bytes=settings.max_code_bytes,
        max_stdin_bytes=settings.max_stdin_bytes,
    )
    packages = PackagesClient(
        settings.packages_address, settings.packages_dir, settings.packages_wait_seconds
    )
    markers = UserMarkers(settings.secrets_markers_dir) if settings.secrets_markers_dir else None
    executions = Executions(backend, secrets, audit, policy, packages, markers)

    async def close() -> None:
        await backend.close()
        await secrets.close()
        await packages.close()
        await audit.close()

    services = executor_pb2.DESCRIPTOR.services_by_name
    return ServiceParts(
        servicers=[
            Servicer(
                executor_pb2_grpc.add_ExecutorServiceServicer_to_server,
                ExecutorServicer(executions),
                services["ExecutorService"].full_name,
            ),
            Servicer(
                executor_pb2_grpc.add_ExecutorCapabilitiesServiceServicer_to_server,
                CapabilitiesServicer(backend, policy),
                services["ExecutorCapabilitiesService"].full_name,
            ),
            Servicer(
                executor_pb2_grpc.add_ExecutorEncryptedServiceServicer_to_server,
                EncryptedExecutorServicer(executions),
                services["ExecutorEncryptedService"].full_name,
            ),
        ],
        on_stop=[close],
    )


DEFINITION = ServiceDefinition(name="executor", load_settings=executor_settings.load, build=build)
