"""The audit service's logic: appending to a user's chain, reading it a page at a time, checking it."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.audit.chain import (
    ChainedEntry,
    ChainHeadView,
    NotJsonSafe,
    Verdict,
    canonical_json,
    canonical_value,
    hash_of,
    verify_chain,
)
from services.audit.models import ChainHead, Entry
from services.audit.storage import AuditRepository
from services.platform.db import Database, utc_now
from services.platform.errors import InvalidArgument

ACTION = re.compile(r"^[a-z][a-z0-9_.]{1,63}$")
# "cancelled": the caller went away and the action was stopped (e.g. a run whose client hung up).
OUTCOMES = ("success", "failure", "denied", "cancelled")
MAX_RECORD_ID_LENGTH = 128
MAX_RESOURCE_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 128
MAX_CLIENT_IP_LENGTH = 64
MAX_DETAILS_BYTES = 8 * 1024
# Sequences are int32 in the API.
MAX_SEQUENCE = 2**31 - 1
_CURSOR = re.compile(r"^seq:([1-9][0-9]{0,9})$")
_MAX_CURSOR_LENGTH = 64


@dataclass(frozen=True)
class RecordInput:
    """One action to append, as a service reported it."""

    record_id: str
    action: str
    resource: str
    outcome: str
    request_id: str
    client_ip: str
    details: Mapping[str, Any]


@dataclass(frozen=True)
class EntryQuery:
    """Which of the caller's entries to list; `limit` 0 means the service's page size."""

    limit: int = 0
    cursor: str = ""
    action: str = ""
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Page:
    entries: list[ChainedEntry]
    next_cursor: str


def encode_cursor(sequence: int) -> str:
    """An opaque cursor: the page after it holds entries older than `sequence`."""
    return base64.urlsafe_b64encode(f"seq:{sequence}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    refused = InvalidArgument("cursor is malformed; pass the nextCursor of a previous page")
    if len(cursor) > _MAX_CURSOR_LENGTH:
        raise refused
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        raise refused from None
    match = _CURSOR.fullmatch(raw)
    if match is None or int(match.group(1)) > MAX_SEQUENCE:
        raise refused
    return int(match.group(1))


def _view(entry: Entry) -> ChainedEntry:
    return ChainedEntry(
        id=entry.id,
        sequence=entry.sequence,
        timestamp=entry.timestamp,
        action=entry.action,
        resource=entry.resource,
        outcome=entry.outcome,
        request_id=entry.request_id,
        client_ip=entry.client_ip,
        details=entry.details,
        prev_hash=entry.prev_hash,
        hash=entry.hash,
    )


def _head_view(head: ChainHead | None) -> ChainHeadView | None:
    return None if head is None else ChainHeadView(head.last_sequence, head.last_hash)


def _check_length(name: str, value: str, maximum: int) -> None:
    if len(value) > maximum:
        raise InvalidArgument(f"{name} must be at most {maximum} characters")


def _valid_details(record: RecordInput) -> dict[str, Any]:
    """The details in canonical form (integral numbers as integers), within the size limit."""
    try:
        details = canonical_value(dict(record.details))
        size = len(canonical_json(details).encode("utf-8"))
    except NotJsonSafe as error:
        raise InvalidArgument(f"details cannot be recorded: {error}") from None
    if size > MAX_DETAILS_BYTES:
        raise InvalidArgument(f"details must be at most {MAX_DETAILS_BYTES} bytes of JSON, got {size}")
    return details


def validate_record(record: RecordInput) -> dict[str, Any]:
    """Refuses a malformed record; returns its details in canonical form."""
    if not record.record_id:
        raise InvalidArgument("record_id is required (an idempotency key chosen by the caller)")
    _check_length("record_id", record.record_id, MAX_RECORD_ID_LENGTH)
    if not record.action:
        raise InvalidArgument("action is required")
    if not ACTION.fullmatch(record.action):
        raise InvalidArgument(
            "action must be 2-64 characters of a-z, 0-9, '_' and '.', starting with a letter, "
            "such as auth.login"
        )
    if record.outcome not in OUTCOMES:
        raise InvalidArgument(f"outcome must be one of {', '.join(OUTCOMES)}")
    _check_length("resource", record.resource, MAX_RESOURCE_LENGTH)
    _check_length("request_id", record.request_id, MAX_REQUEST_ID_LENGTH)
    _check_length("client_ip", record.client_ip, MAX_CLIENT_IP_LENGTH)
    return _valid_details(record)


class AuditLog:
    """Every user's append-only, hash-chained log of actions."""

    def __init__(self, db: Database, page_size: int, max_page_size: int) -> None:
        self._db = db
        self._page_size = page_size
        self._max_page_size = max_page_size

    async def record(self, user_id: str, record: RecordInput) -> tuple[ChainedEntry, bool]:
        """Append `record` to the user's chain; a known record_id returns its entry and False."""
        details = validate_record(record)

        def append(session: Session) -> tuple[ChainedEntry, bool]:
            repository = AuditRepository(session)
            head = repository.lock_head(user_id, utc_now())
            if repository.recorded(user_id, record.record_id):
                existing = repository.entry_by_record_id(user_id, record.record_id)
                if existing is not None:
                    return existing, False
            if head.last_sequence >= MAX_SEQUENCE:  # pragma: no cover - two billion entries
                raise InvalidArgument("this audit log is full")
            # Taken under the lock, so timestamps never decrease along a chain (clock permitting).
            unhashed = ChainedEntry(
                id=str(uuid.uuid4()),
                sequence=head.last_sequence + 1,
                timestamp=utc_now(),
                action=record.action,
                resource=record.resource,
                outcome=record.outcome,
                request_id=record.request_id,
                client_ip=record.client_ip,
                details=details,
                prev_hash=head.last_hash,
                hash="",
            )
            entry = replace(unhashed, hash=hash_of(unhashed))
            repository.append(user_id, record.record_id, entry)
            return entry, True

        try:
            return await self._db.run(append)
        except IntegrityError:
            # Appends to one chain are serialized, so this is a safety net: if a concurrent retry
            # stored the same record_id first, answer with its entry.
            existing = await self._db.run(
                lambda session: AuditRepository(session).entry_by_record_id(user_id, record.record_id)
            )
            if existing is None:
                raise
            return existing, False

    async def entries(self, user_id: str, query: EntryQuery) -> Page:
        """A page of the user's entries, newest first; the next page continues below the last sequence
        seen, so entries appended meanwhile never shift it (no duplicates, no gaps)."""
        if query.limit < 0 or query.limit > self._max_page_size:
            raise InvalidArgument(f"limit must be between 1 and {self._max_page_size} (0 for the default)")
        limit = query.limit or self._page_size
        before = decode_cursor(query.cursor) if query.cursor else None
        if query.action and not ACTION.fullmatch(query.action):
            raise InvalidArgument("action filter is not a valid action name, such as auth.login")
        if query.since is not None and query.until is not None and query.since > query.until:
            raise InvalidArgument("since must not be after until")

        def read(session: Session) -> list[ChainedEntry]:
            rows = AuditRepository(session).page(
                user_id,
                limit + 1,
                before_sequence=before,
                action=query.action,
                since=query.since,
                until=query.until,
            )
            return [_view(row) for row in rows]

        rows = await self._db.run(read)
        if len(rows) <= limit:
            return Page(rows, "")
        rows = rows[:limit]
        return Page(rows, encode_cursor(rows[-1].sequence))

    async def verify(self, user_id: str) -> Verdict:
        """Recompute the user's whole chain from entry 1."""

        def check(session: Session) -> Verdict:
            repository = AuditRepository(session)
            head = _head_view(repository.head(user_id))
            if head is None:
                return verify_chain(map(_view, repository.chain(user_id, MAX_SEQUENCE)), None)
            up_to = head.last_sequence
            beyond = repository.highest_sequence_after(user_id, head.last_sequence)
            if beyond is not None:
                latest = _head_view(repository.head(user_id))
                # Entries past the head that no append accounts for (an append moves the head in the
                # same transaction): verify them too, so the verdict names them.
                if latest is None or latest.last_sequence < beyond:
                    up_to = beyond
            return verify_chain(map(_view, repository.chain(user_id, up_to)), head)

        return await self._db.run(check)
