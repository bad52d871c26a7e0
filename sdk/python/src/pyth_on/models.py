"""The API's answers as typed, immutable objects (built from the JSON the REST API prints)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

_FRACTION = re.compile(r"\.(\d+)")


def parse_timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp as the API prints it (`2026-12-02T11:53:31.123456789Z`), or None."""
    if not isinstance(value, str) or not value:
        return None
    # Protobuf prints up to nine fractional digits; datetime holds six.
    text = _FRACTION.sub(lambda match: "." + match.group(1)[:6].ljust(6, "0"), value, count=1)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    return value if isinstance(value, str) else ""


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    # int64 fields are printed as strings in proto JSON.
    return int(value) if isinstance(value, int | str) and str(value).lstrip("-").isdigit() else 0


def _bool(data: Mapping[str, Any], name: str) -> bool:
    return data.get(name) is True


@dataclass(frozen=True)
class ExecutionResult:
    """What a run printed and how it ended (`output` is stdout, `error` stderr)."""

    output: str
    error: str
    exit_code: int
    duration_ms: int
    timed_out: bool
    truncated: bool
    execution_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecutionResult:
        return cls(
            output=_str(data, "output"),
            error=_str(data, "error"),
            exit_code=_int(data, "exitCode"),
            duration_ms=_int(data, "durationMs"),
            timed_out=_bool(data, "timedOut"),
            truncated=_bool(data, "truncated"),
            execution_id=_str(data, "executionId"),
        )

    @property
    def stdout(self) -> str:
        return self.output

    @property
    def stderr(self) -> str:
        return self.error

    @property
    def ok(self) -> bool:
        """The program exited 0 within its time."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class OutputEvent:
    """A piece of the program's output, as it was produced."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class ResultEvent:
    """The last event of a stream: the run's whole result (the same as `execute` answers)."""

    result: ExecutionResult


StreamEvent = OutputEvent | ResultEvent


@dataclass(frozen=True)
class SecretMetadata:
    """A stored secret; never its value."""

    name: str
    description: str
    version: int
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecretMetadata:
        return cls(
            name=_str(data, "name"),
            description=_str(data, "description"),
            version=_int(data, "version"),
            created_at=parse_timestamp(data.get("createdAt")),
            updated_at=parse_timestamp(data.get("updatedAt")),
        )


PackageStatus = Literal["pending", "building", "ready", "failed"]


@dataclass(frozen=True)
class Package:
    """One entry of the user's package list; `version` is what the build resolved (once ready)."""

    name: str
    spec: str
    version: str
    status: str
    reason: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Package:
        return cls(
            name=_str(data, "name"),
            spec=_str(data, "spec"),
            version=_str(data, "version"),
            status=_str(data, "status"),
            reason=_str(data, "reason"),
        )

    @property
    def settled(self) -> bool:
        """Built or failed: nothing more will happen to it."""
        return self.status in ("ready", "failed")


def packages_from_json(data: Mapping[str, Any]) -> list[Package]:
    return [Package.from_json(item) for item in data.get("packages") or []]


@dataclass(frozen=True)
class EncryptedCode:
    """A stored zero-knowledge payload; `size` and `sha256` are the ciphertext's."""

    name: str
    language: str
    size: int
    sha256: str
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncryptedCode:
        return cls(
            name=_str(data, "name"),
            language=_str(data, "language"),
            size=_int(data, "size"),
            sha256=_str(data, "sha256"),
            created_at=parse_timestamp(data.get("createdAt")),
            updated_at=parse_timestamp(data.get("updatedAt")),
        )


@dataclass(frozen=True)
class Generation:
    """Code written by the model for a prompt and, when it was executed, the run's output."""

    code: str
    language: str
    packages: list[str]
    model: str
    output: str
    error: str
    exit_code: int
    explanation: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        return cls(
            code=_str(data, "code"),
            language=_str(data, "language"),
            packages=[item for item in data.get("packages") or [] if isinstance(item, str)],
            model=_str(data, "model"),
            output=_str(data, "output"),
            error=_str(data, "error"),
            exit_code=_int(data, "exitCode"),
            explanation=_str(data, "explanation"),
        )


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the caller's audit log. `raw` is the entry's JSON as printed, which the hash
    recipe (README, "Audit log") covers."""

    id: str
    sequence: int
    timestamp: datetime | None
    action: str
    resource: str
    outcome: str
    request_id: str
    client_ip: str
    details: dict[str, Any]
    hash: str
    prev_hash: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEntry:
        details = data.get("details")
        return cls(
            id=_str(data, "id"),
            sequence=_int(data, "sequence"),
            timestamp=parse_timestamp(data.get("timestamp")),
            action=_str(data, "action"),
            resource=_str(data, "resource"),
            outcome=_str(data, "outcome"),
            request_id=_str(data, "requestId"),
            client_ip=_str(data, "clientIp"),
            details=dict(details) if isinstance(details, dict) else {},
            hash=_str(data, "hash"),
            prev_hash=_str(data, "prevHash"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class AuditPage:
    """One page of the audit log, newest first; `next_cursor` is empty on the last page."""

    entries: list[AuditEntry]
    next_cursor: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditPage:
        return cls(
            entries=[AuditEntry.from_json(item) for item in data.get("entries") or []],
            next_cursor=_str(data, "nextCursor"),
        )


@dataclass(frozen=True)
class ChainVerification:
    """The server's recomputation of the caller's hash chain. Keep `head_hash`: only a head you kept
    shows a rewritten history."""

    valid: bool
    entries: int
    broken_at_sequence: int
    message: str
    head_hash: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChainVerification:
        return cls(
            valid=_bool(data, "valid"),
            entries=_int(data, "entries"),
            broken_at_sequence=_int(data, "brokenAtSequence"),
            message=_str(data, "message"),
            head_hash=_str(data, "headHash"),
        )


@dataclass(frozen=True)
class User:
    id: str
    email: str
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> User:
        return cls(
            id=_str(data, "id"),
            email=_str(data, "email"),
            created_at=parse_timestamp(data.get("createdAt")),
        )


@dataclass(frozen=True)
class Session:
    """What register and login answer: an access token, a refresh token and the user's API key."""

    token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    api_key: str = field(repr=False)
    expires_in: int
    user: User

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Session:
        user = data.get("user")
        return cls(
            token=_str(data, "token"),
            refresh_token=_str(data, "refreshToken"),
            api_key=_str(data, "apiKey"),
            expires_in=_int(data, "expiresIn"),
            user=User.from_json(user if isinstance(user, dict) else {}),
        )
