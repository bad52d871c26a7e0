"""The zk service's repository: a user's stored payloads, nothing about requests."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.zk.models import StoredCode


class ZkRepository:
    """Operations on one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def find(self, user_id: str, name: str) -> StoredCode | None:
        return self._session.scalar(
            sa.select(StoredCode).where(StoredCode.user_id == user_id, StoredCode.name == name)
        )

    def all_of(self, user_id: str) -> list[StoredCode]:
        query = sa.select(StoredCode).where(StoredCode.user_id == user_id).order_by(StoredCode.name)
        return list(self._session.scalars(query))

    def count(self, user_id: str) -> int:
        query = sa.select(sa.func.count()).select_from(StoredCode).where(StoredCode.user_id == user_id)
        return int(self._session.scalar(query) or 0)

    def add(self, row: StoredCode) -> None:
        self._session.add(row)
        self._session.flush()

    def remove(self, row_id: str) -> None:
        self._session.execute(sa.delete(StoredCode).where(StoredCode.id == row_id))
