"""The decision behind Envoy's ext_authz check: who is calling, and may they, right now."""

from __future__ import annotations

from dataclasses import dataclass

from services.auth.accounts import Accounts, Refusal
from services.auth.api_keys import PREFIX as API_KEY_PREFIX
from services.auth.rate_limits import TokenBuckets
from services.platform.access import is_limited_by_client_ip, is_public
from services.platform.identity import Identity

BEARER = "bearer "


@dataclass(frozen=True)
class Decision:
    """Allowed (with the identity to assert, if any) or refused with an HTTP status and message."""

    allowed: bool
    identity: Identity | None = None
    http_status: int = 200
    message: str = ""
    retry_after: int = 0


class EdgeCheck:
    def __init__(self, accounts: Accounts, user_limits: TokenBuckets, client_ip_limits: TokenBuckets) -> None:
        self._accounts = accounts
        self._user_limits = user_limits
        self._client_ip_limits = client_ip_limits

    async def decide(self, path: str, headers: dict[str, str], client_ip: str) -> Decision:
        if is_limited_by_client_ip(path):
            wait = self._client_ip_limits.take(f"{client_ip}|{path}")
            if wait:
                return Decision(
                    False, http_status=429, message="too many requests; retry later", retry_after=wait
                )
        if is_public(path):
            return Decision(True)
        identity = await self._identify(headers)
        if isinstance(identity, Refusal):
            return Decision(False, http_status=401, message=identity.message)
        if identity is None:
            return Decision(False, http_status=401, message=_refusal(headers))
        wait = self._user_limits.take(identity.user_id)
        if wait:
            return Decision(
                False, http_status=429, message="rate limit exceeded; retry later", retry_after=wait
            )
        return Decision(True, identity=identity)

    async def _identify(self, headers: dict[str, str]) -> Identity | Refusal | None:
        api_key = headers.get("x-api-key", "").strip()
        if api_key:
            return await self._accounts.identify_api_key(api_key)
        authorization = headers.get("authorization", "")
        if authorization[: len(BEARER)].lower() == BEARER:
            return await self._accounts.identify_access_token(authorization[len(BEARER) :].strip())
        return None


def _refusal(headers: dict[str, str]) -> str:
    """Why a call without a valid credential is refused, and where the credential goes; the
    credentials are judged in the order `_identify` reads them."""
    if headers.get("x-api-key", "").strip():
        return "invalid credentials: no such API key (x-api-key)"
    authorization = headers.get("authorization", "")
    if authorization[: len(BEARER)].lower() == BEARER:
        if authorization[len(BEARER) :].strip().startswith(API_KEY_PREFIX):
            return (
                f"invalid credentials: an API key ({API_KEY_PREFIX}...) goes in the x-api-key header; "
                "Authorization: Bearer takes the access token from /api/login"
            )
        return "invalid credentials: the access token is invalid or expired; log in again at /api/login"
    if "authorization" in headers:
        return "invalid credentials: Authorization takes Bearer <access token>; an API key goes in x-api-key"
    return "missing credentials: send x-api-key: <API key> or Authorization: Bearer <access token>"
