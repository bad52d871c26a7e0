"""The auth service's logic: registering, logging in, refreshing, and telling who a credential is."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy.orm import Session

from services.auth import passwords
from services.auth.api_keys import ApiKeys
from services.auth.models import RefreshToken, User
from services.auth.storage import AuthRepository, EmailTaken
from services.auth.tokens import AccessTokens, InvalidToken, new_refresh_token, refresh_token_digest
from services.platform.db import Database, utc_now
from services.platform.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from services.platform.identity import Identity

MAX_EMAIL_LENGTH = 254
_EMAIL = re.compile(
    r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$"
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


class _RefreshOutcome(Enum):
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REUSED = "reused"


def normalize_email(email: str) -> str:
    """Lower-cased and trimmed; refuses anything that is not a plausible address."""
    email = email.strip().lower()
    if not email or len(email) > MAX_EMAIL_LENGTH or not _EMAIL.match(email):
        raise InvalidArgument("email must be a valid address such as name@example.com")
    return email


def _view(user: User) -> UserView:
    return UserView(id=user.id, email=user.email, created_at=user.created_at)


class Accounts:
    """Users and their credentials."""

    def __init__(
        self,
        db: Database,
        api_keys: ApiKeys,
        access_tokens: AccessTokens,
        refresh_token_ttl_seconds: int,
    ) -> None:
        self._db = db
        self._api_keys = api_keys
        self._access_tokens = access_tokens
        self._refresh_ttl = timedelta(seconds=refresh_token_ttl_seconds)

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
            user, refresh_token = await self._db.run(create)
        except EmailTaken:
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
        if user is None or not ok:
            raise Unauthenticated(LOGIN_REFUSED)
        refresh_token = await self._db.run(lambda s: self._start_refresh_family(AuthRepository(s), user.id))
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, refresh_token)

    async def refresh(self, presented: str) -> Credentials:
        digest = refresh_token_digest(presented)

        def rotate(session: Session) -> tuple[User, str] | _RefreshOutcome:
            repository = AuthRepository(session)
            now = utc_now()
            token = repository.refresh_token_by_digest(digest)
            if token is None:
                return _RefreshOutcome.UNKNOWN
            if not repository.spend_refresh_token(token.id, now):
                # A spent or revoked token came back: someone holds a copy. Revoke the whole family.
                repository.revoke_family(token.family_id, now)
                return _RefreshOutcome.REUSED
            if token.expires_at <= now:
                return _RefreshOutcome.EXPIRED
            user = repository.user_by_id(token.user_id)
            if user is None:
                return _RefreshOutcome.UNKNOWN
            return user, self._issue_refresh_token(repository, user.id, token.family_id, now)

        outcome = await self._db.run(rotate)
        if outcome is _RefreshOutcome.REUSED:
            raise Unauthenticated(
                "refresh token was already used; its session has been revoked, log in again"
            )
        if outcome is _RefreshOutcome.EXPIRED:
            raise Unauthenticated("refresh token has expired; log in again")
        if isinstance(outcome, _RefreshOutcome):
            raise Unauthenticated("invalid refresh token")
        user, refresh_token = outcome
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, refresh_token)

    async def user(self, user_id: str) -> UserView:
        user = await self._db.run(lambda s: AuthRepository(s).user_by_id(user_id))
        if user is None:
            raise NotFound("user not found")
        return _view(user)

    async def identify_api_key(self, api_key: str) -> Identity | None:
        digest = self._api_keys.digest(api_key)
        user = await self._db.run(lambda s: AuthRepository(s).user_by_api_key_digest(digest))
        return Identity(user_id=user.id, email=user.email) if user else None

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
