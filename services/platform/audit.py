"""The audit client every service uses: one line per action, written before the service answers.

A change and its record form one unit of work, and each service orders the two so that nothing
acknowledged is missing from the log: either the change is made first and undone if its record
cannot be written, or the record is written first and the change made only after it. If the audit
service cannot store a record, `record` raises Unavailable saying the request was not carried out;
a caller that could not undo its change must say so instead (see `CHANGE_KEPT_UNRECORDED`).

`run_to_completion` runs such a unit of work as a task of its own, so that a cancelled request (the
client hung up, Envoy went away, a deadline passed) cannot stop it between the change and its
record or its undo."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, Unavailable
from services.platform.identity import request_scope
from services.platform.service_graph import IDENTITY_HEADER

T = TypeVar("T")
log = logging.getLogger("pythonon.audit_client")

SUCCESS, FAILURE, DENIED = "success", "failure", "denied"
# The caller went away (hung up, or its deadline passed) and the action was stopped.
CANCELLED = "cancelled"
# Pauses between attempts of a record with a deadline.
_RETRY_PAUSES = (0.1, 0.2, 0.5, 1.0)
UNAVAILABLE_MESSAGE = "the audit log is unavailable, so the request was not carried out; retry later"
# For the rare case where a change was made, its record could not be written, and undoing it failed
# too: the caller must not be told that nothing happened.
CHANGE_KEPT_UNRECORDED = (
    "the audit log is unavailable and the change could not be undone: it was carried out but is not "
    "in the audit log; an operator has been alerted in the service's log"
)

# Units of work still running, whether or not their request is still waiting for them.
_running: set[asyncio.Task[Any]] = set()


async def run_to_completion(work: Coroutine[Any, Any, T], *, action: str) -> T:
    """Run `work` (a change and its audit record, or its undo) to its end, even when the request
    that started it is cancelled.

    The work runs as a task of its own, awaited through `asyncio.shield`: cancelling the request
    cancels only the wait. The task keeps the request's context (identity, request id, trace) and
    is bounded by the deadlines of its own steps (every audit call, Vault call and database
    transaction has one), not by the request's. Its end is logged when nobody waits for it any
    more; `wait_for_units_of_work` lets a stopping service finish them before it closes its
    clients."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            log.info("request cancelled; its unit of work goes on", extra={"action": action})
            task.add_done_callback(lambda finished: _log_abandoned(finished, action))
        raise


def finish_in_background(work: Coroutine[Any, Any, Any], *, action: str) -> None:
    """Start `work` (e.g. the record of an action its caller abandoned) without waiting for it; a
    stopping service still waits for it (`wait_for_units_of_work`), and its end is logged."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    task.add_done_callback(lambda finished: _log_abandoned(finished, action))


def _log_abandoned(task: asyncio.Task[Any], action: str) -> None:
    if task.cancelled():
        log.error("a unit of work was cancelled before it finished", extra={"action": action})
        return
    error = task.exception()
    if error is None:
        log.info("unit of work finished after its request was cancelled", extra={"action": action})
    elif isinstance(error, DomainError):
        log.warning(
            "unit of work failed after its request was cancelled",
            extra={"action": action, "code": error.code.name},
        )
    else:
        log.error(
            "unit of work failed after its request was cancelled",
            extra={"action": action},
            exc_info=error,
        )


async def wait_for_units_of_work(timeout_seconds: float) -> int:
    """Wait (up to `timeout_seconds`) for units of work still running; returns how many are left."""
    pending = set(_running)
    if pending:
        _done, pending = await asyncio.wait(pending, timeout=timeout_seconds)
        if pending:
            log.error("units of work still running at shutdown", extra={"count": len(pending)})
    return len(pending)


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
        record_id: str | None = None,
        deadline_seconds: float | None = None,
    ) -> audit_pb2.AuditEntry:
        """Append one entry to the chain of the user the assertion names (by default the assertion
        of the request in hand). Never pass secret values, passwords, code or output in details.

        Every attempt carries the same record id (the audit service stores it once however often it
        arrives): by default two attempts; with `deadline_seconds`, attempts go on until the
        deadline (for an action that already happened and must not go unrecorded)."""
        scope = request_scope()
        request = audit_pb2.RecordRequest(
            record_id=record_id or uuid.uuid4().hex,
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
        loop = asyncio.get_running_loop()
        deadline = None if deadline_seconds is None else loop.time() + deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._stub.Record(request, metadata=metadata)
                return response.entry
            except DomainError as error:
                code = error.upstream_code or error.code
                log.warning(
                    "audit record failed", extra={"action": action, "attempt": attempt, "code": code.name}
                )
                if not isinstance(error, Unavailable):
                    raise Unavailable(UNAVAILABLE_MESSAGE) from None
                if deadline is None:
                    if attempt == 2:
                        raise Unavailable(UNAVAILABLE_MESSAGE) from None
                    continue
                pause = _RETRY_PAUSES[min(attempt, len(_RETRY_PAUSES)) - 1]
                if loop.time() + pause >= deadline:
                    raise Unavailable(UNAVAILABLE_MESSAGE) from None
                await asyncio.sleep(pause)

    async def close(self) -> None:
        await self._channel.close()


def _struct(details: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(details)
    return value
