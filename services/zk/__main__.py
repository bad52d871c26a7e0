"""The zk service process: `python -m services.zk`."""

from __future__ import annotations

from pythonon.executor.v1 import executor_pb2_grpc
from pythonon.zk.v1 import zk_pb2, zk_pb2_grpc

from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.client import connect
from services.platform.db import Database, Schema
from services.platform.settings import ServerSettings
from services.zk import settings as zk_settings
from services.zk.servicer import ZkServicer
from services.zk.settings import ZkSettings
from services.zk.stored_code import EncryptedCode, ZkLimits


async def build(server: ServerSettings, settings: ZkSettings) -> ServiceParts:
    """Wire the zk service's parts from its settings (tests call this too)."""
    db = Database(settings.database_url)
    db.require_at_head(Schema("zk"))  # `pyth-on migrate` brings it there, once
    audit = AuditClient(settings.audit_address)
    # A run may wait in line for a sandbox and then run for the executor's longest timeout.
    executor = connect(
        "executor", settings.executor_address, timeout_seconds=settings.execute_timeout_seconds
    )
    code = EncryptedCode(
        db,
        executor_pb2_grpc.ExecutorEncryptedServiceStub(executor),
        audit,
        ZkLimits(settings.max_code_bytes, settings.max_payloads_per_user),
        settings.encrypt_concurrency,
    )

    async def close() -> None:
        await executor.close()
        await audit.close()
        db.dispose()

    return ServiceParts(
        servicers=[
            Servicer(
                zk_pb2_grpc.add_ZkServiceServicer_to_server,
                ZkServicer(code),
                zk_pb2.DESCRIPTOR.services_by_name["ZkService"].full_name,
            )
        ],
        on_stop=[close],
    )


DEFINITION = ServiceDefinition(name="zk", load_settings=zk_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
