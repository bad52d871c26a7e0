"""The hash chain of a user's audit log: the recipe, and the check that a stored chain is intact.

Every entry's ``hash`` is computed from exactly the fields a client sees in the entry's JSON
(``GET /api/v1/audit``), so a client can recompute it without trusting the service::

    hash = sha256_hex(utf8(canonical_json))
    canonical_json = json.dumps(
        {
            "id": <id>,                  # string (uuid)
            "sequence": <sequence>,      # integer, 1, 2, 3, ... per user
            "timestamp": <timestamp>,    # the RFC 3339 string exactly as printed, e.g.
                                         # "2025-01-02T03:04:05.123456Z" (0, 3 or 6 fraction digits)
            "action": <action>,          # string
            "resource": <resource>,      # string ("" when absent)
            "outcome": <outcome>,        # string
            "requestId": <requestId>,    # string ("" when absent)
            "clientIp": <clientIp>,      # string ("" when absent)
            "details": <details>,        # object ({} when absent), numbers normalised as below
            "prevHash": <prevHash>,      # string: the previous entry's hash; 64 "0"s for entry 1
        },
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    )

``sha256_hex`` is the lower-case hex SHA-256 digest. Keys are sorted (by Unicode code point) at
every depth, there is no whitespace, and non-ASCII characters are written as themselves (UTF-8), not
as ``\\u`` escapes; control characters and quotes are escaped as Python's ``json.dumps`` escapes them.
The values are the ones the JSON holds once parsed, not its text: the edge may print ``<`` as
``\\u003c`` or ``0.1`` with 17 digits, and the hash is the same either way.

Numbers in ``details`` travel as doubles (``google.protobuf.Struct``), and JSON printers disagree on
how to write them (``1234`` or ``1234.0``, ``1e+15`` or ``1000000000000000``), so the recipe writes
an integral number as a plain integer (no fraction, no exponent: ``1e+15`` becomes
``1000000000000000``, ``-0.0`` becomes ``0``) and any other number as Python's ``repr(float)`` writes
it (the shortest string that reads back as the same double, e.g. ``0.1``, ``2.5``, ``1e-07``).
Services keep fractional values out of ``details`` where they can (durations in whole milliseconds),
which keeps the recipe trivially portable to languages that print floats differently.

The chain makes an edited, removed or reordered entry detectable by anyone who recomputes it. It
has no secret key: someone who can write the database could rebuild every hash after an edit, so a
client that keeps the ``headHash`` it last saw also detects a rewritten history.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

GENESIS_HASH = "0" * 64
# How far from its place a moved entry is looked for, to say "reordered" rather than "altered".
_MOVED_SEARCH_RADIUS = 1000


class NotJsonSafe(ValueError):
    """A value that has no JSON form (NaN, infinity, a non-string key)."""


def canonical_value(value: Any) -> Any:
    """`value` with every number normalised as the recipe writes it (integral numbers as ints)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJsonSafe("numbers must be finite")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        canonical: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotJsonSafe("object keys must be strings")
            canonical[key] = canonical_value(item)
        return canonical
    if isinstance(value, list | tuple):
        return [canonical_value(item) for item in value]
    raise NotJsonSafe(f"{type(value).__name__} has no JSON form")


def canonical_json(value: Any) -> str:
    """The one JSON text of `value` that the recipe hashes."""
    return json.dumps(
        canonical_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def timestamp_text(moment: datetime) -> str:
    """The RFC 3339 string protobuf's JSON printing (and so the edge) writes for `moment`."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp.ToJsonString()


@dataclass(frozen=True)
class ChainedEntry:
    """What the hash covers, plus the hash stored with it."""

    id: str
    sequence: int
    timestamp: datetime
    action: str
    resource: str
    outcome: str
    request_id: str
    client_ip: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str


def entry_hash(
    *,
    entry_id: str,
    sequence: int,
    timestamp: datetime,
    action: str,
    resource: str,
    outcome: str,
    request_id: str,
    client_ip: str,
    details: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """The hash of one entry, per the recipe in this module's docstring."""
    document = {
        "id": entry_id,
        "sequence": sequence,
        "timestamp": timestamp_text(timestamp),
        "action": action,
        "resource": resource,
        "outcome": outcome,
        "requestId": request_id,
        "clientIp": client_ip,
        "details": details,
        "prevHash": prev_hash,
    }
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def hash_of(entry: ChainedEntry, sequence: int | None = None) -> str:
    """The hash `entry` should carry (at `sequence`, by default its own)."""
    return entry_hash(
        entry_id=entry.id,
        sequence=entry.sequence if sequence is None else sequence,
        timestamp=entry.timestamp,
        action=entry.action,
        resource=entry.resource,
        outcome=entry.outcome,
        request_id=entry.request_id,
        client_ip=entry.client_ip,
        details=entry.details,
        prev_hash=entry.prev_hash,
    )


@dataclass(frozen=True)
class ChainHeadView:
    """What the log remembers of a chain's newest entry, apart from the entries themselves."""

    last_sequence: int
    last_hash: str


@dataclass(frozen=True)
class Verdict:
    valid: bool
    entries: int
    broken_at_sequence: int
    message: str
    head_hash: str


def _recorded_as(entry: ChainedEntry, place: int) -> int | None:
    """The other position this entry's hash was computed for, if it was moved from there intact."""
    low, high = max(1, place - _MOVED_SEARCH_RADIUS), place + _MOVED_SEARCH_RADIUS
    for sequence in range(low, high + 1):
        if sequence != place and hash_of(entry, sequence) == entry.hash:
            return sequence
    return None


def verify_chain(entries: Iterable[ChainedEntry], head: ChainHeadView | None) -> Verdict:
    """Recompute a chain from entry 1: every hash, every link, no gaps, and the head at the end.

    `entries` must come in ascending sequence order. The first fault found is reported; `entries` of
    the verdict counts the entries that verified before it (all of them when the chain is intact)."""
    expected = 1
    previous = GENESIS_HASH

    def broken(sequence: int, message: str) -> Verdict:
        # The newest hash as the log records it (its head), else the last one that verified.
        if head is not None:
            newest = head.last_hash
        else:
            newest = "" if previous == GENESIS_HASH else previous
        return Verdict(False, expected - 1, sequence, message, newest)

    for entry in entries:
        if entry.sequence != expected:
            if entry.sequence < expected:
                return broken(expected, f"entry {expected} appears twice or out of place")
            if entry.sequence == expected + 1:
                return broken(expected, f"entry {expected} is missing")
            return broken(expected, f"entries {expected} to {entry.sequence - 1} are missing")
        if hash_of(entry) != entry.hash:
            moved_from = _recorded_as(entry, expected)
            if moved_from is not None:
                return broken(
                    expected,
                    f"entry {expected} was recorded as entry {moved_from}: the entries were reordered",
                )
            return broken(expected, f"entry {expected} was altered")
        if entry.prev_hash != previous:
            return broken(
                expected,
                f"entry {expected} does not follow entry {expected - 1}: "
                "an earlier entry was rewritten or replaced",
            )
        previous = entry.hash
        expected += 1

    count = expected - 1
    if head is None:
        if count == 0:
            return Verdict(True, 0, 0, "no entries yet", "")
        return broken(count, "the chain head is missing")
    if count == 0 and head.last_sequence == 0:
        return Verdict(True, 0, 0, "no entries yet", "")
    if count < head.last_sequence:
        removed = head.last_sequence - count
        if removed == 1:
            return broken(count + 1, "the newest entry was removed")
        return broken(count + 1, f"the newest {removed} entries were removed")
    if count > head.last_sequence:
        return broken(head.last_sequence + 1, "entries were added after the chain head, outside the log")
    if previous != head.last_hash:
        return broken(count, f"entry {count} was replaced")
    return Verdict(True, count, 0, f"all {count} entries verify", previous)
