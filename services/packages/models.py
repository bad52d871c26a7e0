"""The packages service's tables: each user's requirement list, the set each user wants built, and
one build per requirement set (shared by every user who asks for the same set)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.platform.db import UtcDateTime


class Base(DeclarativeBase):
    pass


class UserPackage(Base):
    """One requirement of a user's list, in the order the user gave it."""

    __tablename__ = "package_requirements"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[str] = mapped_column(String(256))
    position: Mapped[int] = mapped_column(Integer)


class UserSet(Base):
    """The requirement set a user's list makes (a user with an empty list has no row)."""

    __tablename__ = "package_user_sets"
    __table_args__ = (Index("ix_package_user_sets_set_key", "set_key"),)

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    set_key: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Build(Base):
    """The build of one requirement set for this service's target: its state, and once resolved,
    the lock's hash and the environment it made (content-addressed: equal locks, one environment)."""

    __tablename__ = "package_builds"

    set_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The requirements, one per line, as given to the resolver.
    requirements: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    environment_key: Mapped[str] = mapped_column(String(64), default="")
    # Canonical name → installed version, for every package of the lock.
    versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
