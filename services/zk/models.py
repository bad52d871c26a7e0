"""The zk service's table: payloads as the client encrypted them; nothing here can be decrypted
without the password, which is never stored."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import UtcDateTime


class Base(DeclarativeBase):
    pass


class StoredCode(Base):
    __tablename__ = "zk_code"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_zk_code_user_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36), index=True)
    # Lower-cased: names are case-insensitive (see names.py).
    name: Mapped[str] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str] = mapped_column(String(64))
    salt: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    memory_kib: Mapped[int] = mapped_column(Integer)
    iterations: Mapped[int] = mapped_column(Integer)
    parallelism: Mapped[int] = mapped_column(Integer)
    # Hex SHA-256 of the ciphertext.
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
