"""The audit client every service uses: one line per action, written before the service answers.

If the audit service cannot store the record, `record` raises Unavailable, the caller's unit of
work rolls back, and the user gets 503: nothing acknowledged is missing from the log."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from google.protobuf import struct_pb2
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, Unavailable
from services.platform.identity import request_scope
from services.platform.service_graph import IDENTITY_HEADER

log = logging.getLogger("pythonon.audit_client")

SUCCESS, FAILURE, DENIED = "success", "failure", "denied"
UNAVAILABLE_MESSAGE = "the audit log is unavailable, so the request was not carried out; retry later"


class AuditClient:
    """Records actions in the audit service for the user of the request in hand."""

    def __init__(self, address: str | None = None, timeout_seconds: float = 3.0) -> None:
        self._channel = connect("audit", address, timeout_seconds=timeout_seconds)
        self._stub = audit_pb2_grpc.AuditRecorderServiceStub(self._channel)

    async def record(
        self,
        action: str,
        resource: str,
        outcome: str,
        details: dict[str, Any] | None = None,
        *,
        assertion: str | None = None,
    ) -> audit_pb2.AuditEntry:
        """Append one entry to the chain of the user the assertion names (by default the assertion
        of the request in hand). Never pass secret values, passwords, code or output in details."""
        scope = request_scope()
        request = audit_pb2.RecordRequest(
            record_id=uuid.uuid4().hex,
            action=action,
            resource=resource,
            outcome=outcome,
            request_id=scope.request_id,
            client_ip=scope.client_ip,
        )
        if details:
            request.details.CopyFrom(_struct(details))
        # The channel forwards the request's own assertion; an explicit one (an event signed for a
        # user who is not yet the request's, e.g. at login) takes its place.
        metadata = ((IDENTITY_HEADER, assertion),) if assertion else None
        # One retry with the same record_id: the audit service stores it once either way.
        for attempt in (1, 2):
            try:
                response = await self._stub.Record(request, metadata=metadata)
                return response.entry
            except DomainError as error:
                code = error.upstream_code or error.code
                log.warning(
                    "audit record failed", extra={"action": action, "attempt": attempt, "code": code.name}
                )
                if not isinstance(error, Unavailable) or attempt == 2:
                    raise Unavailable(UNAVAILABLE_MESSAGE) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._channel.close()


def _struct(details: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(details)
    return value
