"""The auth service's audit records. Its calls are public (no identity assertion arrives with them),
so it signs an assertion for the user concerned itself — it is the one service that can."""

from __future__ import annotations

from typing import Any

from services.platform.audit import AuditClient
from services.platform.identity import Identity, IdentitySigner


class AuthEvents:
    def __init__(self, audit: AuditClient, signer: IdentitySigner) -> None:
        self._audit = audit
        self._signer = signer

    async def record(
        self, user: Identity, action: str, outcome: str, details: dict[str, Any] | None = None
    ) -> None:
        """Record an action on the user's chain (ANONYMOUS when no user is known); never a password."""
        resource = f"user/{user.user_id}"
        await self._audit.record(action, resource, outcome, details, assertion=self._signer.sign(user))
