"""Users' secrets in Vault's KV version 2 engine, through hvac.

Each secret is one KV entry, `<mount>/data/<prefix>/<user id>/<NAME>`, holding `{value, description}`;
its version and times come from the entry's KV metadata. hvac is blocking, so the logic calls this
store from a worker thread. Every Vault failure that is not the caller's doing becomes Unavailable
here, in one place; nothing in this module logs or raises with a secret value in it."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from services.platform.errors import PermissionDenied, Unavailable
from services.secrets.settings import VaultSettings

T = TypeVar("T")
log = logging.getLogger("pythonon.secrets.vault")

UNAVAILABLE_MESSAGE = (
    "secrets are unavailable: the secret store (Vault) cannot be reached or is sealed; retry later"
)
_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
# Vault's answers that mean "not now", as opposed to "not like that".
_OUTAGES = (
    requests.RequestException,
    hvac.exceptions.VaultDown,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.UnexpectedError,
)
_REFUSALS = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)


class CheckAndSetConflict(Exception):
    """The entry changed between reading its version and writing the next one."""


@dataclass(frozen=True)
class EntryState:
    """A KV entry's metadata: `live` is false when its current version is deleted or destroyed (a
    tombstone left by a delete that could not finish)."""

    current_version: int
    live: bool
    created_at: datetime


# The payload's field that keeps the secret's creation time from its second version on.
CREATED_FIELD = "created"


@dataclass(frozen=True)
class SecretRecord:
    """What may be shown about a secret: never its value."""

    name: str
    description: str
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Written:
    version: int
    created_at: datetime  # of this version


def parse_time(value: str) -> datetime:
    """Vault's RFC 3339 times carry nanoseconds; Python keeps microseconds."""
    match = _TIME.fullmatch(value or "")
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    whole, fraction, zone = match.groups()
    micros = (fraction or "0")[:6].ljust(6, "0")
    parsed = datetime.fromisoformat(f"{whole}.{micros}{'+00:00' if zone == 'Z' else zone}")
    return parsed.astimezone(UTC)


class VaultSecretStore:
    """One hvac client for the service, logged in with a token file or AppRole (lazily, so the service
    starts and reports 503 while Vault is down); a refused token triggers one fresh login."""

    def __init__(self, settings: VaultSettings) -> None:
        self._settings = settings
        self._client = hvac.Client(
            url=settings.address,
            verify=str(settings.ca_file) if settings.ca_file else True,
            timeout=settings.timeout_seconds,
            namespace=settings.namespace,
        )
        # The service talks to Vault directly, never through a proxy from its environment.
        self._client.session.trust_env = False
        self._login_lock = threading.Lock()
        self._logged_in = False

    # -- the entries --------------------------------------------------------------------------------

    def names(self, user_id: str) -> list[str]:
        """The names of the user's entries (tombstones included), sorted."""
        return sorted(key for key in self._list(self._folder(user_id)) if not key.endswith("/"))

    def users(self) -> list[str]:
        """The ids of the users who have entries (tombstones included)."""
        return sorted(key[:-1] for key in self._list(f"{self._settings.path_prefix}/") if key.endswith("/"))

    def state(self, user_id: str, name: str) -> EntryState | None:
        try:
            response = self._call(
                lambda kv: kv.read_secret_metadata(path=self._path(user_id, name), mount_point=self._mount)
            )
        except hvac.exceptions.InvalidPath:
            return None
        return _state(response["data"])

    def describe(self, user_id: str, name: str) -> SecretRecord | None:
        """The secret's metadata and description, or None when it does not exist (or is a tombstone).

        One read of the current version: the secret's creation time is that version's when it is
        the first, else the one `write` kept in the payload; only an entry written without it (by
        an earlier version of this code, or restored by `revert`) costs a read of its metadata."""
        data = self._read(user_id, name)
        if data is None:
            return None
        payload, version_info = data
        version = int(version_info["version"])
        if version == 1:
            created_at = parse_time(version_info["created_time"])
        elif isinstance(payload.get(CREATED_FIELD), str):
            created_at = parse_time(payload[CREATED_FIELD])
        else:
            state = self.state(user_id, name)
            if state is None or not state.live:
                return None
            created_at = state.created_at
        return SecretRecord(
            name=name,
            description=str(payload.get("description", "")),
            version=version,
            created_at=created_at,
            updated_at=parse_time(version_info["created_time"]),
        )

    def value(self, user_id: str, name: str) -> str | None:
        data = self._read(user_id, name)
        return None if data is None else str(data[0].get("value", ""))

    def write(
        self,
        user_id: str,
        name: str,
        value: str,
        description: str,
        *,
        cas: int,
        created_at: datetime | None = None,
    ) -> Written:
        """Write the next version; `cas` is the current version (0: the entry must not exist).
        `created_at`, the secret's creation time when this is not its first version, is kept in the
        payload so that `describe` needs no read of the metadata."""
        secret = {"value": value, "description": description}
        if created_at is not None:
            secret[CREATED_FIELD] = created_at.isoformat()
        try:
            response = self._call(
                lambda kv: kv.create_or_update_secret(
                    path=self._path(user_id, name),
                    secret=secret,
                    cas=cas,
                    mount_point=self._mount,
                )
            )
        except hvac.exceptions.InvalidRequest as error:
            if "check-and-set" in str(error):
                raise CheckAndSetConflict(name) from None
            raise
        return Written(
            version=int(response["data"]["version"]), created_at=parse_time(response["data"]["created_time"])
        )

    def soft_delete(self, user_id: str, name: str) -> None:
        """Delete the current version, reversibly (see `undelete`)."""
        self._call(
            lambda kv: kv.delete_latest_version_of_secret(
                path=self._path(user_id, name), mount_point=self._mount
            )
        )

    def undelete(self, user_id: str, name: str, version: int) -> None:
        self._call(
            lambda kv: kv.undelete_secret_versions(
                path=self._path(user_id, name), versions=[version], mount_point=self._mount
            )
        )

    def purge(self, user_id: str, name: str) -> None:
        """Remove the entry, every version and its metadata, for good."""
        self._call(
            lambda kv: kv.delete_metadata_and_all_versions(
                path=self._path(user_id, name), mount_point=self._mount
            )
        )

    def revert(self, user_id: str, name: str, *, to_version: int, from_version: int) -> None:
        """Make `to_version`'s content current again (as a new version) and destroy `from_version`."""
        data = self._call(
            lambda kv: kv.read_secret_version(
                path=self._path(user_id, name),
                version=to_version,
                mount_point=self._mount,
                raise_on_deleted_version=True,
            )
        )
        payload = data["data"]["data"]
        self.write(
            user_id,
            name,
            str(payload.get("value", "")),
            str(payload.get("description", "")),
            cas=from_version,
        )
        self.destroy(user_id, name, from_version)

    def destroy(self, user_id: str, name: str, version: int) -> None:
        """Erase one version's content for good (its metadata stays, marked destroyed)."""
        self._call(
            lambda kv: kv.destroy_secret_versions(
                path=self._path(user_id, name), versions=[version], mount_point=self._mount
            )
        )

    # -- the service's own token ----------------------------------------------------------------------

    def renew_token(self) -> None:
        """Renew the service's token if it can be renewed; log in again when it cannot (AppRole)."""
        try:
            self._call(lambda _kv: self._client.auth.token.renew_self())
        except hvac.exceptions.InvalidRequest:
            # Not renewable (e.g. at its maximum TTL): a new login is the only way on.
            if self._settings.approle is not None:
                with self._login_lock:
                    self._login()

    def close(self) -> None:
        self._client.adapter.close()

    # -- internals ---------------------------------------------------------------------------------

    @property
    def _mount(self) -> str:
        return self._settings.mount

    def _folder(self, user_id: str) -> str:
        # The id comes from a verified assertion, but it becomes a path: allow no separators in it.
        if not _USER_ID.fullmatch(user_id):
            raise PermissionDenied("this identity cannot hold secrets")
        return f"{self._settings.path_prefix}/{user_id}/"

    def _path(self, user_id: str, name: str) -> str:
        return f"{self._folder(user_id)}{name}"

    def _list(self, folder: str) -> list[str]:
        """The keys under `folder` (a trailing "/" marks a folder); none when there is none."""
        try:
            response = self._call(lambda kv: kv.list_secrets(path=folder, mount_point=self._mount))
        except hvac.exceptions.InvalidPath:
            return []
        return list(response["data"]["keys"])

    def _read(self, user_id: str, name: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(data, version metadata) of the current version, or None when there is none."""
        try:
            response = self._call(
                lambda kv: kv.read_secret_version(
                    path=self._path(user_id, name), mount_point=self._mount, raise_on_deleted_version=True
                )
            )
        except hvac.exceptions.InvalidPath:
            return None
        return response["data"]["data"] or {}, response["data"]["metadata"]

    def _call(self, operation: Callable[[Any], T]) -> T:
        """Run one hvac call with the service logged in; outages become Unavailable. A refused token
        gets one fresh login and one retry (it may have expired, or its file been rotated)."""
        for attempt in (1, 2):
            try:
                self._ensure_logged_in(force=attempt == 2)
                return operation(self._client.secrets.kv.v2)
            except _REFUSALS as error:
                if attempt == 2:
                    log.error(
                        "vault refused the service's credentials", extra={"error": type(error).__name__}
                    )
                    raise Unavailable(UNAVAILABLE_MESSAGE) from None
            except _OUTAGES as error:
                log.warning("vault unavailable", extra={"error": type(error).__name__})
                raise Unavailable(UNAVAILABLE_MESSAGE) from None
        raise AssertionError("unreachable")

    def _ensure_logged_in(self, *, force: bool) -> None:
        if self._logged_in and not force:
            return
        with self._login_lock:
            if force or not self._logged_in:
                self._login()

    def _login(self) -> None:
        settings = self._settings
        if settings.token_file is not None:
            token = _read_credential(settings.token_file)
            self._client.token = token
        elif settings.approle is not None:
            role = settings.approle
            secret_id = _read_credential(role.secret_id_file) if role.secret_id_file else None
            self._client.auth.approle.login(
                role_id=_read_credential(role.role_id_file), secret_id=secret_id, mount_point=role.mount
            )
        self._logged_in = True


def _read_credential(path: Any) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        log.error("cannot read a vault credential file", extra={"path": str(path), "error": error.strerror})
        raise Unavailable(UNAVAILABLE_MESSAGE) from None
    if not value:
        log.error("a vault credential file is empty", extra={"path": str(path)})
        raise Unavailable(UNAVAILABLE_MESSAGE)
    return value


def _state(metadata: dict[str, Any]) -> EntryState:
    current = int(metadata.get("current_version") or 0)
    version = (metadata.get("versions") or {}).get(str(current)) or {}
    live = current > 0 and bool(version) and not version.get("deletion_time") and not version.get("destroyed")
    return EntryState(current_version=current, live=live, created_at=parse_time(metadata["created_time"]))
