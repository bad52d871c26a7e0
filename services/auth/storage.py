"""The auth service's repository: users and refresh tokens, nothing about requests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.auth.models import RefreshToken, User


class EmailTaken(Exception):
    """Another user already has this email."""


@dataclass(frozen=True)
class SessionState:
    """What the edge check needs to know about an access token's user and session."""

    user_id: str
    email: str
    # The session has a token of this user (it was opened and not deleted since).
    known: bool
    # A token of the session was revoked: the session is over.
    revoked: bool


def _session_state_statement() -> sa.Select[str, str, bool, bool]:
    """The edge check's one read: the user by primary key, and two probes of the refresh tokens'
    (family_id, revoked_at) index that stop at the first row found, so its cost does not grow with
    the session's rotations. Built once (the check runs on every request)."""
    family = sa.select(RefreshToken.id).where(RefreshToken.family_id == sa.bindparam("session_id"))
    return sa.select(
        User.id,
        User.email,
        family.where(RefreshToken.user_id == sa.bindparam("user_id")).exists(),
        family.where(RefreshToken.revoked_at.is_not(None)).exists(),
    ).where(User.id == sa.bindparam("user_id"))


_SESSION_STATE = _session_state_statement()


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

    def session_state(self, user_id: str, session_id: str) -> SessionState | None:
        """The user (None: no such user) and their session `session_id`, in one statement (see
        `_SESSION_STATE`)."""
        row = self._session.execute(_SESSION_STATE, {"user_id": user_id, "session_id": session_id}).first()
        if row is None:
            return None
        return SessionState(user_id=row[0], email=row[1], known=bool(row[2]), revoked=bool(row[3]))

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
        """Revoke every live token of the family, which ends its session (see `session_state`)."""
        result = self._session.execute(
            sa.update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
