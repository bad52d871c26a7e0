"""gRPC servicers of the audit service: read the request, call the logic, build the response."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc

from services.audit.audit_log import AuditLog, EntryQuery, RecordInput
from services.audit.chain import ChainedEntry
from services.platform.errors import InvalidArgument
from services.platform.identity import request_scope, require_identity


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _optional_datetime(
    request: audit_pb2.ListEntriesRequest, field: Literal["since", "until"]
) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        return getattr(request, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is not a valid timestamp") from None


def _entry(entry: ChainedEntry) -> audit_pb2.AuditEntry:
    message = audit_pb2.AuditEntry(
        id=entry.id,
        sequence=entry.sequence,
        timestamp=_timestamp(entry.timestamp),
        action=entry.action,
        resource=entry.resource,
        outcome=entry.outcome,
        request_id=entry.request_id,
        client_ip=entry.client_ip,
        hash=entry.hash,
        prev_hash=entry.prev_hash,
    )
    # Always present, `{}` when empty, as the hash recipe reads it.
    message.details.SetInParent()
    message.details.update(entry.details)
    return message


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """The caller's own log: reading it and checking its chain."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def ListEntries(
        self, request: audit_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListEntriesResponse:
        query = EntryQuery(
            limit=request.limit,
            cursor=request.cursor,
            action=request.action,
            since=_optional_datetime(request, "since"),
            until=_optional_datetime(request, "until"),
        )
        page = await self._log.entries(require_identity().user_id, query)
        return audit_pb2.ListEntriesResponse(
            entries=[_entry(entry) for entry in page.entries], next_cursor=page.next_cursor
        )

    async def VerifyChain(
        self, request: audit_pb2.VerifyChainRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyChainResponse:
        verdict = await self._log.verify(require_identity().user_id)
        return audit_pb2.VerifyChainResponse(
            valid=verdict.valid,
            entries=verdict.entries,
            broken_at_sequence=verdict.broken_at_sequence,
            message=verdict.message,
            head_hash=verdict.head_hash,
        )


class AuditRecorderServicer(audit_pb2_grpc.AuditRecorderServiceServicer):
    """Internal: services append to the log of the user whose identity assertion they forward."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    async def Record(
        self, request: audit_pb2.RecordRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordResponse:
        scope = request_scope()
        try:
            details = json_format.MessageToDict(request.details)
        except ValueError:
            raise InvalidArgument("details cannot be recorded: numbers must be finite") from None
        record = RecordInput(
            record_id=request.record_id,
            action=request.action,
            resource=request.resource,
            outcome=request.outcome,
            # The caller's request metadata stands in for fields it left empty.
            request_id=request.request_id or scope.request_id,
            client_ip=request.client_ip or scope.client_ip,
            details=details,
        )
        entry, created = await self._log.record(require_identity().user_id, record)
        return audit_pb2.RecordResponse(entry=_entry(entry), created=created)
