"""What the sync and the async client share: each API call as data (method, path, body, how to read
the answer), the retry policy, error decoding and the stream's line decoder. The two clients differ
only in how they send."""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from pyth_on.encryption import ZkPayload
from pyth_on.errors import ApiError
from pyth_on.models import (
    AuditPage,
    ChainVerification,
    EncryptedCode,
    ExecutionResult,
    Generation,
    OutputEvent,
    Package,
    ResultEvent,
    SecretMetadata,
    Session,
    StreamEvent,
    User,
    packages_from_json,
)

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8080"
# A run may wait in the executor's line (up to 30 s) and then run (up to 60 s).
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
USER_AGENT = "pyth-on-client/0.1.0"


@dataclass(frozen=True)
class RetryPolicy:
    """How 429 (rate limited, queue full) and 503 (a part of the mesh unavailable) are retried.

    A call is sent again at most `max_retries` times, after the server's Retry-After when it gave
    one (else `backoff` seconds, doubling). A wait longer than `max_wait` is not waited out: the
    ApiError is raised at once, its `retry_after` saying how long the server asked for. Retries stop
    after the first event of a stream. `RetryPolicy(max_retries=0)` turns retrying off.

    Both statuses mean the call was not carried out and may be sent again, except three 503s that
    are never retried: an execute's "the code ran, but the audit log could not confirm its record"
    and a change's "... it was carried out but is not in the audit log" (sending either again
    would do it twice), and generate's "generation is not configured" (it stays so until the
    operator sets a key).
    """

    max_retries: int = 3
    max_wait: float = 30.0
    backoff: float = 0.5
    statuses: frozenset[int] = frozenset({429, 503})

    def delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending again after `response` (attempt counts from 0; its body
        read), or None."""
        if response.status_code not in self.statuses or attempt >= self.max_retries:
            return None
        if _final(response):
            return None
        wait = retry_after(response.headers)
        if wait is None:
            wait = self.backoff * (2**attempt)
        return wait if wait <= self.max_wait else None


# What the server's 503s say when sending the call again would repeat what was done, or cannot help.
_FINAL_503 = ("the code ran", "it was carried out but", "generation is not configured")


def _final(response: httpx.Response) -> bool:
    """A 503 not to send again (see RetryPolicy; the body has been read)."""
    body = response.content.decode("utf-8", "replace")
    return response.status_code == 503 and any(words in body for words in _FINAL_503)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_error(response: httpx.Response) -> ApiError:
    """The ApiError of a failed answer (whose body must have been read)."""
    status = response.status_code
    code, message = ApiError.code_for_status(status), response.reason_phrase or f"HTTP {status}"
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), int):
            code = body["code"]
        if isinstance(body.get("message"), str):
            message = body["message"]
    return ApiError(
        status,
        code,
        message,
        retry_after=retry_after(response.headers),
        request_id=response.headers.get("x-request-id"),
    )


def decode_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ApiError(
            response.status_code,
            2,
            "the server's answer is not JSON",
            request_id=response.headers.get("x-request-id"),
        ) from None


def credentials(api_key: str | None, token: str | None) -> dict[str, str]:
    """The credential headers: an API key (`po_...`) or a Bearer access token, from the arguments
    or else PYTHONON_API_KEY (an api_key of "" sends none)."""
    if api_key and token:
        raise ValueError("give an api_key or a token, not both")
    if token:
        return {"authorization": f"Bearer {token}"}
    key = api_key if api_key is not None else os.environ.get("PYTHONON_API_KEY")
    return {"x-api-key": key} if key else {}


def base_url(url: str | None) -> str:
    return (url or os.environ.get("PYTHONON_URL") or DEFAULT_URL).rstrip("/")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One REST call and how to read its answer."""

    method: str
    path: str
    read: Callable[[Any], T]
    body: Any = None
    params: Mapping[str, str] | None = None


def _segment(name: str) -> str:
    return quote(name, safe="")


def _ignore(_data: Any) -> None:
    return None


def run_body(
    code: str | None,
    language: str | None,
    stdin: str | None,
    timeout: float | None,
    env: Mapping[str, str] | None,
    secrets: Sequence[str] | None,
) -> dict[str, Any]:
    """The ExecuteRequest (and zk execute) fields that were given; absent `secrets` means all."""
    body: dict[str, Any] = {"code": code} if code is not None else {}
    if language is not None:
        body["language"] = language
    if stdin is not None:
        body["stdin"] = stdin
    if timeout is not None:
        body["timeout"] = timeout
    if env is not None:
        body["env"] = dict(env)
    if secrets is not None:
        body["secrets"] = list(secrets)
    return body


def execute(body: dict[str, Any]) -> Call[ExecutionResult]:
    return Call("POST", "/api/v1/execute", ExecutionResult.from_json, body)


STREAM_PATH = "/api/v1/execute/stream"


def put_secret(name: str, value: str, description: str | None) -> Call[SecretMetadata]:
    body = {"value": value} if description is None else {"value": value, "description": description}
    return Call("PUT", f"/api/v1/secrets/{_segment(name)}", SecretMetadata.from_json, body)


def list_secrets() -> Call[list[SecretMetadata]]:
    return Call(
        "GET",
        "/api/v1/secrets",
        lambda data: [SecretMetadata.from_json(item) for item in data.get("secrets") or []],
    )


def delete_secret(name: str) -> Call[None]:
    return Call("DELETE", f"/api/v1/secrets/{_segment(name)}", _ignore)


def list_packages() -> Call[list[Package]]:
    return Call("GET", "/api/v1/packages", packages_from_json)


def set_packages(specs: Sequence[str]) -> Call[list[Package]]:
    if isinstance(specs, str):
        raise TypeError("packages.set takes a list of requirement specs")
    return Call("PUT", "/api/v1/packages", packages_from_json, {"packages": list(specs)})


def add_package(spec: str) -> Call[list[Package]]:
    return Call("POST", "/api/v1/packages", packages_from_json, {"package": spec})


def remove_package(name: str) -> Call[list[Package]]:
    return Call("DELETE", f"/api/v1/packages/{_segment(name)}", packages_from_json)


def put_code(name: str, payload: ZkPayload | Mapping[str, Any], language: str | None) -> Call[EncryptedCode]:
    body: dict[str, Any] = {"payload": payload.to_json() if isinstance(payload, ZkPayload) else dict(payload)}
    if language is not None:
        body["language"] = language
    return Call("PUT", f"/api/v1/zk/code/{_segment(name)}", EncryptedCode.from_json, body)


def list_code() -> Call[list[EncryptedCode]]:
    return Call(
        "GET",
        "/api/v1/zk/code",
        lambda data: [EncryptedCode.from_json(item) for item in data.get("items") or []],
    )


def delete_code(name: str) -> Call[None]:
    return Call("DELETE", f"/api/v1/zk/code/{_segment(name)}", _ignore)


def run_code(name: str, password: str, body: dict[str, Any]) -> Call[ExecutionResult]:
    return Call(
        "POST",
        f"/api/v1/zk/execute/{_segment(name)}",
        ExecutionResult.from_json,
        {"password": password, **body},
    )


def generate(
    prompt: str, language: str | None, execute: bool, timeout: float | None, install_packages: bool
) -> Call[Generation]:
    body: dict[str, Any] = {"prompt": prompt}
    if language is not None:
        body["language"] = language
    if execute:
        body["execute"] = True
    if timeout is not None:
        body["timeout"] = timeout
    if install_packages:
        body["installPackages"] = True
    return Call("POST", "/api/v1/generate", Generation.from_json, body)


def audit_page(
    cursor: str | None,
    page_size: int | None,
    action: str | None,
    since: datetime | str | None,
    until: datetime | str | None,
) -> Call[AuditPage]:
    params = {
        name: str(value)
        for name, value in (
            ("cursor", cursor),
            ("limit", page_size),
            ("action", action),
            ("since", _rfc3339(since)),
            ("until", _rfc3339(until)),
        )
        if value
    }
    return Call("GET", "/api/v1/audit", AuditPage.from_json, params=params)


def _rfc3339(value: datetime | str | None) -> str | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("since and until must be timezone-aware datetimes (or RFC 3339 strings)")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return value


def verify_chain() -> Call[ChainVerification]:
    return Call("GET", "/api/v1/audit/verify", ChainVerification.from_json)


def login(email: str, password: str) -> Call[Session]:
    return Call("POST", "/api/login", Session.from_json, {"email": email, "password": password})


def register(email: str, password: str) -> Call[Session]:
    return Call("POST", "/api/register", Session.from_json, {"email": email, "password": password})


def whoami() -> Call[User]:
    return Call("POST", "/api/verify", User.from_json, {})


def info() -> Call[dict[str, Any]]:
    return Call("GET", "/api/info", dict)


class StreamDecoder:
    """Reads the lines of `POST /api/v1/execute/stream`: `{"stdout": ...}` and `{"stderr": ...}`
    events, then one `{"result": ExecuteResponse}`; an error after the first event comes as a line
    `{"error": {"code", "message"}}` and is raised as an ApiError."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.finished = False

    def event(self, line: str) -> StreamEvent | None:
        line = line.strip()
        if not line:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            raise ApiError(
                200, 2, "the stream carried a line that is not JSON", request_id=self.request_id
            ) from None
        if not isinstance(data, dict):
            raise ApiError(
                200, 2, "the stream carried a line that is not a JSON object", request_id=self.request_id
            )
        if "error" in data:
            raise ApiError.in_band(data["error"], self.request_id)
        if isinstance(data.get("result"), dict):
            self.finished = True
            return ResultEvent(ExecutionResult.from_json(data["result"]))
        for stream in ("stdout", "stderr"):
            text = data.get(stream)
            if isinstance(text, str) and text:
                return OutputEvent(stream, text)
        return None

    def check_finished(self) -> None:
        if not self.finished:
            raise ApiError(
                200, 14, "the stream ended before the run's result arrived", request_id=self.request_id
            )
