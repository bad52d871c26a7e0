"""The audit service in-process on port 0, a client that signs identity assertions for any user, and
direct access to the service's tables for tampering like someone with database access would."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import sqlalchemy as sa
from pythonon.audit.v1 import audit_pb2, audit_pb2_grpc
from sqlalchemy.sql.expression import Executable

from services.audit.__main__ import build
from services.audit.settings import AuditSettings
from services.platform.bootstrap import start_server
from services.platform.db import create_engine
from services.platform.identity import Identity, IdentitySigner
from services.platform.service_graph import IDENTITY_HEADER
from services.platform.settings import ephemeral_server_settings
from services.runner.migrate import migrate_service
from tests.identity_keys import Keys, make_keys  # noqa: F401 - re-exported for the audit tests

# More pages than any test here needs: a cursor that does not advance fails instead of hanging.
MAX_PAGES = 200


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def new_user() -> str:
    return str(uuid.uuid4())


class AuditClient:
    """Calls the service as a service (Record) or a user (ListEntries, VerifyChain) would."""

    def __init__(self, channel: grpc.aio.Channel, signer: IdentitySigner) -> None:
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)
        self.recorder = audit_pb2_grpc.AuditRecorderServiceStub(channel)
        self._signer = signer

    def identity(self, user_id: str) -> tuple[tuple[str, str], ...]:
        return ((IDENTITY_HEADER, self._signer.sign(Identity(user_id, f"{user_id}@example.com"))),)

    async def record(
        self,
        user_id: str,
        action: str = "thing.done",
        *,
        record_id: str | None = None,
        details: dict[str, Any] | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **fields: str,
    ) -> audit_pb2.RecordResponse:
        request = audit_pb2.RecordRequest(
            record_id=record_id or uuid.uuid4().hex,
            action=action,
            outcome=fields.pop("outcome", "success"),
            **fields,
        )
        if details is not None:
            request.details.update(details)
        return await self.recorder.Record(request, metadata=(*self.identity(user_id), *metadata), timeout=30)

    async def page(self, user_id: str, **query: Any) -> audit_pb2.ListEntriesResponse:
        return await self.audit.ListEntries(
            audit_pb2.ListEntriesRequest(**query), metadata=self.identity(user_id), timeout=30
        )

    async def all_entries(self, user_id: str, **query: Any) -> list[audit_pb2.AuditEntry]:
        """Every page from `cursor` (the first page when absent) on, following nextCursor."""
        entries: list[audit_pb2.AuditEntry] = []
        cursor = str(query.pop("cursor", ""))
        for _ in range(MAX_PAGES):
            page = await self.page(user_id, cursor=cursor, **query)
            entries.extend(page.entries)
            if not page.next_cursor:
                return entries
            cursor = page.next_cursor
        raise AssertionError(f"still paging after {MAX_PAGES} pages")

    async def verify(self, user_id: str) -> audit_pb2.VerifyChainResponse:
        return await self.audit.VerifyChain(
            audit_pb2.VerifyChainRequest(), metadata=self.identity(user_id), timeout=30
        )


@asynccontextmanager
async def audit_service(
    keys: Keys, database_url: str, *, page_size: int = 50, max_page_size: int = 500
) -> AsyncIterator[AuditClient]:
    """The audit service as `python -m services.audit` builds it, on port 0."""
    server_settings = ephemeral_server_settings("audit", keys.public_key_file)
    settings = AuditSettings(database_url=database_url, page_size=page_size, max_page_size=max_page_size)
    migrate_service("audit", database_url)  # as `pyth-on migrate` does before the service starts
    parts = await build(server_settings, settings)
    server, _health, port = await start_server(server_settings, parts)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield AuditClient(channel, keys.signer)
    finally:
        await server.stop(None)
        for close in parts.on_stop:
            await close()


def tamper(database_url: str, *statements: Executable) -> None:
    """Run `statements` against the service's tables with the append-only triggers out of the way,
    as someone who owns the database could; the triggers are back afterwards."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("ALTER TABLE audit_entries DISABLE TRIGGER USER"))
                for statement in statements:
                    connection.execute(statement)
                connection.execute(sa.text("ALTER TABLE audit_entries ENABLE TRIGGER USER"))
                return
            triggers = connection.execute(
                sa.text(
                    "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'audit_entries' AND type = :type"
                ),
                {"type": "trigger"},
            ).all()
            for name, _sql in triggers:
                connection.execute(sa.text(f'DROP TRIGGER "{name}"'))
            for statement in statements:
                connection.execute(statement)
            for _name, sql in triggers:
                connection.execute(sa.text(sql))
    finally:
        engine.dispose()


def query(database_url: str, statement: Executable) -> list[Any]:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            return list(connection.execute(statement).all())
    finally:
        engine.dispose()
