"""The edge check refuses an access token once its session (its refresh-token family) is revoked,
at once and on every replica, on SQLite and PostgreSQL; the integration tests repeat the attack
through Envoy."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from services.auth.accounts import Accounts, Credentials
from services.auth.api_keys import ApiKeys
from services.auth.edge_check import Decision, EdgeCheck
from services.auth.rate_limits import TokenBuckets
from services.auth.settings import RateLimit
from services.auth.tokens import AccessTokens
from services.platform.db import Database
from services.platform.errors import Unauthenticated
from services.platform.identity import generate_private_key_pem
from services.runner.migrate import migrate_service
from tests.postgres import throwaway_database

PASSWORD = "correct horse battery staple"
REVOKED = "invalid credentials: the access token's session has been revoked; log in again at /api/login"
INVALID = "invalid credentials: the access token is invalid or expired; log in again at /api/login"
SESSIONLESS = (
    "invalid credentials: the access token names no session (issued before sessions were checked); "
    "get a new one at /api/refresh or log in again at /api/login"
)


class _Events:
    """The audit log, always available (the auth service's records are tested elsewhere)."""

    async def record(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('auth')}/auth.db"
        migrate_service("auth", url)
        yield url
    else:
        with throwaway_database() as url:
            migrate_service("auth", url)
            yield url


class Replica:
    """One auth replica's parts on the shared database: its accounts and its edge check."""

    def __init__(self, url: str, access_key: bytes, secret: bytes) -> None:
        self.db = Database(url)
        self.accounts = Accounts(self.db, ApiKeys(secret), AccessTokens(access_key, 900), 3600, _Events())  # type: ignore[arg-type]
        unlimited = RateLimit(burst=10**9, per_minute=10**9)
        self.check = EdgeCheck(self.accounts, TokenBuckets(unlimited), TokenBuckets(unlimited))

    async def decide(self, token: str) -> Decision:
        return await self.check.decide("/api/v1/secrets", {"authorization": f"Bearer {token}"}, "127.0.0.1")


@pytest.fixture(scope="module")
def access_key() -> bytes:
    return generate_private_key_pem()


@pytest.fixture()
def replicas(database_url: str, access_key: bytes) -> Iterator[tuple[Replica, Replica]]:
    secret = os.urandom(32)
    pair = (Replica(database_url, access_key, secret), Replica(database_url, access_key, secret))
    yield pair
    for replica in pair:
        replica.db.dispose()


def _email() -> str:
    return f"session-{uuid.uuid4().hex[:12]}@example.com"


def _sign(access_key: bytes, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, serialization.load_pem_private_key(access_key, None), algorithm="EdDSA")  # type: ignore[arg-type]


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _allowed(decision: Decision, user_id: str) -> bool:
    return decision.allowed and decision.identity is not None and decision.identity.user_id == user_id


def test_reuse_refuses_the_sessions_access_tokens_at_once_and_no_other(
    replicas: tuple[Replica, Replica],
) -> None:
    replica = replicas[0]

    async def scenario() -> None:
        registered: Credentials = await replica.accounts.register(_email(), PASSWORD)
        user_id = registered.user.id
        other = await replica.accounts.login(registered.user.email, PASSWORD)
        rotated = await replica.accounts.refresh(registered.refresh_token)
        # A rotation does not end the session: the token of before it still works until it expires.
        for token in (registered.access_token, rotated.access_token, other.access_token):
            assert _allowed(await replica.decide(token), user_id)

        with pytest.raises(Unauthenticated, match="already used"):
            await replica.accounts.refresh(registered.refresh_token)
        for token in (registered.access_token, rotated.access_token):
            decision = await replica.decide(token)
            assert (decision.allowed, decision.http_status, decision.message) == (False, 401, REVOKED)
        assert _allowed(await replica.decide(other.access_token), user_id)
        # The session's newest refresh token was revoked with it, so nothing renews the session.
        with pytest.raises(Unauthenticated):
            await replica.accounts.refresh(rotated.refresh_token)

    asyncio.run(scenario())


def test_a_revocation_on_one_replica_is_refused_by_another_at_once(
    replicas: tuple[Replica, Replica],
) -> None:
    """No replica keeps a cache that another replica's revocation could not reach."""
    first, second = replicas

    async def scenario() -> None:
        registered = await first.accounts.register(_email(), PASSWORD)
        rotated = await first.accounts.refresh(registered.refresh_token)
        assert _allowed(await second.decide(rotated.access_token), registered.user.id)
        with pytest.raises(Unauthenticated, match="already used"):
            await first.accounts.refresh(registered.refresh_token)
        decision = await second.decide(rotated.access_token)
        assert (decision.allowed, decision.http_status, decision.message) == (False, 401, REVOKED)

    asyncio.run(scenario())


def test_a_token_without_a_session_or_with_another_users_session_is_refused(
    replicas: tuple[Replica, Replica], access_key: bytes
) -> None:
    """Correctly signed tokens whose session cannot be checked (issued before tokens named it), does
    not exist, or is another user's: refused; none of them is allowed on the strength of its user."""
    replica = replicas[0]

    async def scenario() -> None:
        alice = await replica.accounts.register(_email(), PASSWORD)
        bob = await replica.accounts.register(_email(), PASSWORD)
        claims = _claims(alice.access_token)
        claims.pop("sid", None)
        now = int(time.time())
        claims.update(iat=now, exp=now + 900)
        sessionless = await replica.decide(_sign(access_key, claims))
        assert (sessionless.allowed, sessionless.http_status, sessionless.message) == (
            False,
            401,
            SESSIONLESS,
        )

        for session_id in (str(uuid.uuid4()), _claims(bob.access_token).get("sid", str(uuid.uuid4()))):
            decision = await replica.decide(_sign(access_key, {**claims, "sid": session_id}))
            assert (decision.allowed, decision.http_status, decision.message) == (False, 401, INVALID)

    asyncio.run(scenario())


def test_the_check_is_one_indexed_read_whatever_the_sessions_length(
    replicas: tuple[Replica, Replica], database_url: str
) -> None:
    """One statement per check, which reaches the refresh tokens through the (family_id, revoked_at)
    index, never by scanning them (PostgreSQL might scan a table this small, so there the planner is
    told to avoid scans: the plan shows that the index serves the statement)."""
    replica = replicas[0]

    async def scenario() -> list[tuple[str, Any]]:
        registered = await replica.accounts.register(_email(), PASSWORD)
        refresh = registered.refresh_token
        for _ in range(20):
            refresh = (await replica.accounts.refresh(refresh)).refresh_token
        statements: list[tuple[str, Any]] = []

        def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
            statements.append((statement, parameters))

        sa.event.listen(replica.db.engine, "before_cursor_execute", count)
        try:
            assert _allowed(await replica.decide(registered.access_token), registered.user.id)
        finally:
            sa.event.remove(replica.db.engine, "before_cursor_execute", count)
        return statements

    statements = asyncio.run(scenario())
    assert len(statements) == 1, statements
    statement, parameters = statements[0]
    sqlite = database_url.startswith("sqlite")
    with replica.db.engine.connect() as connection:
        if not sqlite:
            connection.exec_driver_sql("SET enable_seqscan = off")
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        plan = "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + statement, parameters))
    assert "ix_auth_refresh_tokens_family_id_revoked_at" in plan, plan
    assert "SCAN auth_refresh_tokens" not in plan and "Seq Scan on auth_refresh_tokens" not in plan, plan
