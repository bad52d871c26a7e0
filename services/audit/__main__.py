"""The audit service process: `python -m services.audit`."""

from __future__ import annotations

from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc

from services.audit import settings as audit_settings
from services.audit.audit_log import AuditLog
from services.audit.servicer import AuditRecorderServicer, AuditServicer
from services.audit.settings import AuditSettings
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.db import Database, Schema
from services.platform.settings import ServerSettings


async def build(server: ServerSettings, settings: AuditSettings) -> ServiceParts:
    """Wire the audit service's parts from its settings (tests call this too)."""
    db = Database(settings.database_url)
    db.require_at_head(Schema("audit"))  # `pyth-on migrate` brings it there, once
    log = AuditLog(db, settings.page_size, settings.max_page_size)

    async def close() -> None:
        db.dispose()

    return ServiceParts(
        servicers=[
            Servicer(
                audit_pb2_grpc.add_AuditServiceServicer_to_server,
                AuditServicer(log),
                audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
            ),
            Servicer(
                audit_pb2_grpc.add_AuditRecorderServiceServicer_to_server,
                AuditRecorderServicer(log),
                audit_pb2.DESCRIPTOR.services_by_name["AuditRecorderService"].full_name,
            ),
        ],
        on_stop=[close],
    )


DEFINITION = ServiceDefinition(name="audit", load_settings=audit_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
