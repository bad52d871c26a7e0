"""The audit service's tables: the entries of every user's chain, and each chain's head."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import UtcDateTime


class Base(DeclarativeBase):
    pass


class Entry(Base):
    """One recorded action; rows are only ever inserted (the migration adds triggers that refuse
    UPDATE and DELETE)."""

    __tablename__ = "audit_entries"
    __table_args__ = (
        UniqueConstraint("user_id", "sequence", name="uq_audit_entries_user_sequence"),
        # The idempotency key: a retried Record finds the entry instead of adding another.
        UniqueConstraint("user_id", "record_id", name="uq_audit_entries_user_record"),
        Index("ix_audit_entries_user_action_sequence", "user_id", "action", "sequence"),
        Index("ix_audit_entries_user_timestamp", "user_id", "timestamp"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128))
    sequence: Mapped[int] = mapped_column(Integer)
    record_id: Mapped[str] = mapped_column(String(128))
    timestamp: Mapped[datetime] = mapped_column(UtcDateTime())
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(String(128))
    client_ip: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHead(Base):
    """A user's newest sequence and hash: the row appends lock, and what shows a removed newest entry."""

    __tablename__ = "audit_chains"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
