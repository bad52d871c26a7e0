"""The auth service's tables."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import UtcDateTime


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "auth_users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Stored lower-cased, so uniqueness is case-insensitive on every database.
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # HMAC of the API key, for look-up; the key itself only encrypted.
    api_key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class RefreshToken(Base):
    """A refresh token. Every token issued by rotation from one login shares a family, and the family
    is the login's session: its id is the `sid` claim of the session's access tokens, and reuse of a
    spent token revokes every token of the family, which ends the session (the edge check then
    refuses its access tokens too)."""

    __tablename__ = "auth_refresh_tokens"
    # The edge check asks, for every request with an access token, whether its family has a revoked
    # token: one probe of this index, however many rotations the session has had (migration 0002).
    __table_args__ = (Index("ix_auth_refresh_tokens_family_id_revoked_at", "family_id", "revoked_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    family_id: Mapped[str] = mapped_column(String(36))
    user_id: Mapped[str] = mapped_column(ForeignKey("auth_users.id", ondelete="CASCADE"), index=True)
    token_digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
