"""The auth service's repository: users and refresh tokens, nothing about requests."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.auth.models import RefreshToken, User


class EmailTaken(Exception):
    """Another user already has this email."""


class AuthRepository:
    """Operations on one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def add_user(self, user: User) -> None:
        if self.user_by_email(user.email) is not None:
            raise EmailTaken(user.email)
        self._session.add(user)
        try:
            self._session.flush()
        except IntegrityError:
            # A concurrent registration of the same email won the race.
            raise EmailTaken(user.email) from None

    def user_by_email(self, email: str) -> User | None:
        return self._session.scalar(sa.select(User).where(User.email == email))

    def user_by_id(self, user_id: str) -> User | None:
        return self._session.get(User, user_id)

    def user_by_api_key_digest(self, digest: str) -> User | None:
        return self._session.scalar(sa.select(User).where(User.api_key_digest == digest))

    def add_refresh_token(self, token: RefreshToken) -> None:
        self._session.add(token)
        self._session.flush()

    def refresh_token_by_digest(self, digest: str) -> RefreshToken | None:
        return self._session.scalar(sa.select(RefreshToken).where(RefreshToken.token_digest == digest))

    def spend_refresh_token(self, token_id: str, now: datetime) -> bool:
        """Mark a live token used; False when it was already used or revoked (even concurrently)."""
        result = self._session.execute(
            sa.update(RefreshToken)
            .where(
                RefreshToken.id == token_id,
                RefreshToken.used_at.is_(None),
                RefreshToken.revoked_at.is_(None),
            )
            .values(used_at=now)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]

    def unspend_refresh_token(self, token_id: str, spent_at: datetime) -> None:
        """Make a token live again, if it is still as `spend_refresh_token` left it at `spent_at`."""
        self._session.execute(
            sa.update(RefreshToken)
            .where(
                RefreshToken.id == token_id,
                RefreshToken.used_at == spent_at,
                RefreshToken.revoked_at.is_(None),
            )
            .values(used_at=None)
        )

    def delete_refresh_tokens(self, token_ids: list[str]) -> None:
        self._session.execute(sa.delete(RefreshToken).where(RefreshToken.id.in_(token_ids)))

    def revoke_family(self, family_id: str, now: datetime) -> int:
        result = self._session.execute(
            sa.update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
