"""The audit client every service uses: one line per action, written before the service answers.

If the audit service cannot store the record, `record` raises Unavailable, the caller's unit of
work rolls back, and the user gets 503: nothing acknowledged is missing from the log."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from google.protobuf import struct_pb2
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc

from edge.config import IDENTITY_HEADER
from services.platform.errors import Unavailable
from services.platform.identity import request_scope

log = logging.getLogger("pythonon.audit_client")

SUCCESS, FAILURE, DENIED = "success", "failure", "denied"
UNAVAILABLE_MESSAGE = "the audit log is unavailable, so the request was not carried out; retry later"


class AuditClient:
    """Records actions in the audit service for the user of the request in hand."""

    def __init__(self, address: str, timeout_seconds: float = 3.0) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = audit_pb2_grpc.AuditRecorderServiceStub(self._channel)
        self._timeout = timeout_seconds

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
        metadata = [(IDENTITY_HEADER, assertion or scope.assertion)]
        if scope.request_id:
            metadata.append(("x-request-id", scope.request_id))
        # One retry with the same record_id: the audit service stores it once either way.
        for attempt in (1, 2):
            try:
                response = await self._stub.Record(request, metadata=metadata, timeout=self._timeout)
                return response.entry
            except grpc.aio.AioRpcError as error:
                retryable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                log.warning(
                    "audit record failed",
                    extra={"action": action, "attempt": attempt, "code": error.code().name},
                )
                if not retryable or attempt == 2:
                    raise Unavailable(UNAVAILABLE_MESSAGE) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._channel.close()


def _struct(details: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(details)
    return value
