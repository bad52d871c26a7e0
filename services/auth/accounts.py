"""The auth service's logic: registering, logging in, refreshing, and telling who a credential is."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from services.auth import passwords
from services.auth.api_keys import ApiKeys, RecentApiKeys
from services.auth.events import AuthEvents
from services.auth.models import RefreshToken, User
from services.auth.storage import AuthRepository, EmailTaken
from services.auth.tokens import AccessTokens, InvalidToken, new_refresh_token, refresh_token_digest
from services.platform.audit import DENIED, FAILURE, SUCCESS
from services.platform.db import Database, utc_now
from services.platform.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.platform.identity import ANONYMOUS, Identity

MAX_EMAIL_LENGTH = 254
# Matched whole (fullmatch): no control characters (NUL, terminal escapes) anywhere, since the
# address is shown back in answers, logs and the audit list.
_EMAIL = re.compile(
    r"[^@\s\x00-\x1f\x7f-\x9f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
LOGIN_REFUSED = "invalid email or password"


@dataclass(frozen=True)
class UserView:
    id: str
    email: str
    created_at: datetime


@dataclass(frozen=True)
class Credentials:
    access_token: str
    refresh_token: str
    api_key: str
    expires_in: int
    user: UserView


@dataclass(frozen=True)
class _Rotation:
    """What presenting a refresh token led to: `refresh_token` is set only when it was rotated."""

    outcome: str  # "rotated", "unknown", "expired" or "reused"
    user: User | None = None
    refresh_token: str = ""
    revoked: int = 0


def normalize_email(email: str) -> str:
    """Lower-cased and trimmed; refuses anything that is not a plausible address."""
    email = email.strip().lower()
    if not email or len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        raise InvalidArgument("email must be a valid address such as name@example.com")
    return email


def _view(user: User) -> UserView:
    return UserView(id=user.id, email=user.email, created_at=user.created_at)


class Accounts:
    """Users and their credentials. Every change is recorded in the audit log before it commits."""

    def __init__(
        self,
        db: Database,
        api_keys: ApiKeys,
        access_tokens: AccessTokens,
        refresh_token_ttl_seconds: int,
        events: AuthEvents,
        *,
        api_key_cache_seconds: float = 0,
    ) -> None:
        self._db = db
        self._api_keys = api_keys
        self._recent_keys = RecentApiKeys(api_key_cache_seconds)
        self._access_tokens = access_tokens
        self._refresh_ttl = timedelta(seconds=refresh_token_ttl_seconds)
        self._events = events

    async def register(self, email: str, password: str) -> Credentials:
        email = normalize_email(email)
        passwords.check_strength(password, email)
        password_hash = await asyncio.to_thread(passwords.hash_password, password)
        api_key = self._api_keys.new()
        user_id = str(uuid.uuid4())

        def create(session: Session) -> tuple[UserView, str]:
            repository = AuthRepository(session)
            user = User(
                id=user_id,
                email=email,
                password_hash=password_hash,
                api_key_digest=self._api_keys.digest(api_key),
                api_key_ciphertext=self._api_keys.encrypt(api_key, user_id),
                created_at=utc_now(),
            )
            repository.add_user(user)
            return _view(user), self._start_refresh_family(repository, user_id)

        try:
            async with self._db.unit_of_work() as uow:
                user, refresh_token = await uow.run(create)
                await self._events.record(Identity(user.id, user.email), "auth.register", SUCCESS)
        except EmailTaken:
            await self._events.record(ANONYMOUS, "auth.register", FAILURE, {"reason": "email_taken"})
            raise AlreadyExists("a user with this email already exists") from None
        return self._credentials(user, api_key, refresh_token)

    async def login(self, email: str, password: str) -> Credentials:
        try:
            email = normalize_email(email)
        except InvalidArgument:
            email = ""
        user = await self._db.run(lambda s: AuthRepository(s).user_by_email(email)) if email else None
        # Verify even for an unknown email, so both refusals take the same time and say the same thing.
        ok = await asyncio.to_thread(
            passwords.verify_password, user.password_hash if user else None, password
        )
        if user is None:
            await self._events.record(ANONYMOUS, "auth.login", FAILURE, {"reason": "unknown_email"})
            raise Unauthenticated(LOGIN_REFUSED)
        identity = Identity(user.id, user.email)
        if not ok:
            await self._events.record(identity, "auth.login", FAILURE, {"reason": "wrong_password"})
            raise Unauthenticated(LOGIN_REFUSED)
        async with self._db.unit_of_work() as uow:
            refresh_token = await uow.run(lambda s: self._start_refresh_family(AuthRepository(s), user.id))
            await self._events.record(identity, "auth.login", SUCCESS)
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, refresh_token)

    async def refresh(self, presented: str) -> Credentials:
        digest = refresh_token_digest(presented)

        def rotate(session: Session) -> _Rotation:
            repository = AuthRepository(session)
            now = utc_now()
            token = repository.refresh_token_by_digest(digest)
            user = repository.user_by_id(token.user_id) if token else None
            if token is None or user is None:
                return _Rotation("unknown")
            if not repository.spend_refresh_token(token.id, now):
                # A spent or revoked token came back: someone holds a copy. Revoke the whole family.
                return _Rotation("reused", user, revoked=repository.revoke_family(token.family_id, now))
            if token.expires_at <= now:
                return _Rotation("expired", user)
            return _Rotation(
                "rotated", user, self._issue_refresh_token(repository, user.id, token.family_id, now)
            )

        async with self._db.unit_of_work() as uow:
            rotation = await uow.run(rotate)
            user = rotation.user
            subject = ANONYMOUS if user is None else Identity(user.id, user.email)
            outcomes: dict[str, tuple[str, dict[str, Any] | None]] = {
                "unknown": (FAILURE, {"reason": "unknown_token"}),
                "reused": (DENIED, {"reason": "refresh_token_reuse", "revoked_tokens": rotation.revoked}),
                "expired": (FAILURE, {"reason": "expired"}),
                "rotated": (SUCCESS, None),
            }
            outcome, details = outcomes[rotation.outcome]
            await self._events.record(subject, "auth.refresh", outcome, details)
        if rotation.outcome == "reused":
            raise Unauthenticated(
                "refresh token was already used; its session has been revoked, log in again"
            )
        if rotation.outcome == "expired":
            raise Unauthenticated("refresh token has expired; log in again")
        if user is None:
            raise Unauthenticated("invalid refresh token")
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, rotation.refresh_token)

    async def user(self, user_id: str) -> UserView:
        user = await self._db.run(lambda s: AuthRepository(s).user_by_id(user_id))
        if user is None:
            raise NotFound("user not found")
        return _view(user)

    async def identify_api_key(self, api_key: str) -> Identity | None:
        digest = self._api_keys.digest(api_key)
        identity = self._recent_keys.get(digest)
        if identity is not None:
            return identity
        user = await self._db.run(lambda s: AuthRepository(s).user_by_api_key_digest(digest))
        if user is None:
            return None
        identity = Identity(user_id=user.id, email=user.email)
        self._recent_keys.put(digest, identity)
        return identity

    async def identify_access_token(self, token: str) -> Identity | None:
        try:
            claims = self._access_tokens.verify(token)
        except InvalidToken:
            return None
        user = await self._db.run(lambda s: AuthRepository(s).user_by_id(claims.user_id))
        return Identity(user_id=user.id, email=user.email) if user else None

    def _start_refresh_family(self, repository: AuthRepository, user_id: str) -> str:
        return self._issue_refresh_token(repository, user_id, str(uuid.uuid4()), utc_now())

    def _issue_refresh_token(
        self, repository: AuthRepository, user_id: str, family_id: str, now: datetime
    ) -> str:
        token = new_refresh_token()
        repository.add_refresh_token(
            RefreshToken(
                id=str(uuid.uuid4()),
                family_id=family_id,
                user_id=user_id,
                token_digest=refresh_token_digest(token),
                created_at=now,
                expires_at=now + self._refresh_ttl,
            )
        )
        return token

    def _credentials(self, user: UserView, api_key: str, refresh_token: str) -> Credentials:
        return Credentials(
            access_token=self._access_tokens.issue(user.id, user.email),
            refresh_token=refresh_token,
            api_key=api_key,
            expires_in=self._access_tokens.ttl_seconds,
            user=user,
        )
