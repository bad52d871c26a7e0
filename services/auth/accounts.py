"""The auth service's logic: registering, logging in, refreshing, and telling who a credential is.

Every change and its audit record form one unit of work that runs to its end even if the caller
hangs up (`run_to_completion`). No database transaction is open while a password is hashed or
verified or while the audit service is called; each transaction is one short step:
- register: the `auth.register` record is written first, on the new user's own chain, and the
  user is created only after it. A user that exists always has its record; if creating it then
  fails (the email was taken meanwhile, or the database refused), a failure entry follows on the
  same chain where possible. The API key is returned only after both.
- login: the new refresh token is stored, then the login is recorded; if the record cannot be
  written the token is deleted and the caller gets 503 (not carried out). A token left behind by a
  crash in between was never shown to anyone, so it cannot be used.
- refresh: the rotation (old token spent, new one stored) is committed, then recorded; if the
  record cannot be written the rotation is undone (old token live again, new one deleted). A reused
  token's family is revoked whether or not the audit log can record it: safety comes first, and
  the answer then says exactly that.

A login's refresh-token family is its session: every access token names it (`sid`), and the edge
check refuses an access token whose session was revoked, from the moment the revocation commits,
on every replica (it reads the database; nothing is cached)."""

from __future__ import annotations

import logging
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
from services.platform.audit import DENIED, FAILURE, SUCCESS, run_to_completion
from services.platform.db import Database, utc_now
from services.platform.errors import (
    AlreadyExists,
    DomainError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from services.platform.identity import ANONYMOUS, Identity

log = logging.getLogger("pythonon.auth")

MAX_EMAIL_LENGTH = 254
# Matched whole (fullmatch): no control characters (NUL, terminal escapes) anywhere, since the
# address is shown back in answers, logs and the audit list.
_EMAIL = re.compile(
    r"[^@\s\x00-\x1f\x7f-\x9f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
LOGIN_REFUSED = "invalid email or password"
EMAIL_TAKEN = "a user with this email already exists"
SESSION_REVOKED = (
    "invalid credentials: the access token's session has been revoked; log in again at /api/login"
)
# Access tokens issued before they named their session cannot be tied to one, so whether their
# session was revoked is unknown: refused, like a revoked one. Their refresh token still works.
SESSIONLESS_TOKEN = (
    "invalid credentials: the access token names no session (issued before sessions were checked); "
    "get a new one at /api/refresh or log in again at /api/login"
)
REVOKED_UNRECORDED = (
    "refresh token was already used; its session has been revoked, log in again (the audit log "
    "could not record the revocation)"
)


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
class Refusal:
    """A credential refused for a reason the caller should be told (rather than the generic one)."""

    message: str


@dataclass(frozen=True)
class _Rotation:
    """What presenting a refresh token led to: `refresh_token` is set only when it was rotated."""

    outcome: str  # "rotated", "unknown", "expired" or "reused"
    user: User | None = None
    refresh_token: str = ""
    session_id: str = ""
    revoked: int = 0
    # What undoes a rotation: the spent token, when it was spent, and the new token's id.
    spent_token_id: str = ""
    spent_at: datetime | None = None
    new_token_id: str = ""


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
        password_hash = await passwords.hash_in_background(password)
        if await self._db.run(lambda s: AuthRepository(s).user_by_email(email)) is not None:
            await self._events.record(ANONYMOUS, "auth.register", FAILURE, {"reason": "email_taken"})
            raise AlreadyExists(EMAIL_TAKEN)
        return await run_to_completion(self._create_user(email, password_hash), action="auth.register")

    async def _create_user(self, email: str, password_hash: str) -> Credentials:
        """Record the registration on the new user's chain, then create the user (see the module
        docstring for why in this order)."""
        api_key = self._api_keys.new()
        identity = Identity(str(uuid.uuid4()), email)

        def create(session: Session) -> tuple[UserView, str, str]:
            repository = AuthRepository(session)
            user = User(
                id=identity.user_id,
                email=email,
                password_hash=password_hash,
                api_key_digest=self._api_keys.digest(api_key),
                api_key_ciphertext=self._api_keys.encrypt(api_key, identity.user_id),
                created_at=utc_now(),
            )
            repository.add_user(user)
            _, refresh_token, session_id = self._start_refresh_family(repository, identity.user_id)
            return _view(user), refresh_token, session_id

        await self._events.record(identity, "auth.register", SUCCESS)
        try:
            user, refresh_token, session_id = await self._db.run(create)
        except EmailTaken:
            # Another registration of this email won the race after the check above.
            await self._record_quietly(identity, "auth.register", FAILURE, {"reason": "email_taken"})
            await self._events.record(ANONYMOUS, "auth.register", FAILURE, {"reason": "email_taken"})
            raise AlreadyExists(EMAIL_TAKEN) from None
        except Exception:
            await self._record_quietly(identity, "auth.register", FAILURE, {"reason": "not_stored"})
            raise
        return self._credentials(user, api_key, refresh_token, session_id)

    async def login(self, email: str, password: str) -> Credentials:
        # A field left out is the request's mistake, not a refused credential: a 400 naming it.
        if not email.strip():
            raise InvalidArgument("email is required to log in")
        if not password:
            raise InvalidArgument("password is required to log in")
        try:
            email = normalize_email(email)
        except InvalidArgument:
            email = ""
        user = await self._db.run(lambda s: AuthRepository(s).user_by_email(email)) if email else None
        # Verify even for an unknown email, so both refusals take the same time and say the same thing.
        ok = await passwords.verify_in_background(user.password_hash if user else None, password)
        if user is None:
            await self._events.record(ANONYMOUS, "auth.login", FAILURE, {"reason": "unknown_email"})
            raise Unauthenticated(LOGIN_REFUSED)
        identity = Identity(user.id, user.email)
        if not ok:
            await self._events.record(identity, "auth.login", FAILURE, {"reason": "wrong_password"})
            raise Unauthenticated(LOGIN_REFUSED)
        return await run_to_completion(self._open_session(user), action="auth.login")

    async def _open_session(self, user: User) -> Credentials:
        """Store a new refresh token, then record the login; without the record, no token."""
        token_id, refresh_token, session_id = await self._db.run(
            lambda s: self._start_refresh_family(AuthRepository(s), user.id)
        )
        try:
            await self._events.record(Identity(user.id, user.email), "auth.login", SUCCESS)
        except Unavailable:
            await self._forget_tokens(token_id)
            raise
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, refresh_token, session_id)

    async def refresh(self, presented: str) -> Credentials:
        return await run_to_completion(self._refresh(presented), action="auth.refresh")

    async def _refresh(self, presented: str) -> Credentials:
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
            new_token_id, new_token = self._issue_refresh_token(repository, user.id, token.family_id, now)
            return _Rotation("rotated", user, new_token, token.family_id, 0, token.id, now, new_token_id)

        rotation = await self._db.run(rotate)
        user = rotation.user
        subject = ANONYMOUS if user is None else Identity(user.id, user.email)
        outcomes: dict[str, tuple[str, dict[str, Any] | None]] = {
            "unknown": (FAILURE, {"reason": "unknown_token"}),
            "reused": (DENIED, {"reason": "refresh_token_reuse", "revoked_tokens": rotation.revoked}),
            "expired": (FAILURE, {"reason": "expired"}),
            "rotated": (SUCCESS, None),
        }
        outcome, details = outcomes[rotation.outcome]
        try:
            await self._events.record(subject, "auth.refresh", outcome, details)
        except Unavailable:
            if rotation.outcome == "rotated":
                await self._undo_rotation(rotation)
            if rotation.outcome == "reused":
                log.error("a refresh token family was revoked without an audit record")
                raise Unavailable(REVOKED_UNRECORDED) from None
            raise
        if rotation.outcome == "reused":
            raise Unauthenticated(
                "refresh token was already used; its session has been revoked, log in again"
            )
        if rotation.outcome == "expired":
            raise Unauthenticated("refresh token has expired; log in again")
        if user is None:
            raise Unauthenticated("invalid refresh token")
        api_key = self._api_keys.decrypt(user.api_key_ciphertext, user.id)
        return self._credentials(_view(user), api_key, rotation.refresh_token, rotation.session_id)

    async def _undo_rotation(self, rotation: _Rotation) -> None:
        """Make the presented token live again and delete the one issued for it (never shown)."""
        spent_at = rotation.spent_at
        if spent_at is None:  # pragma: no cover - set for every rotation
            raise AssertionError("a rotation without its spent token")

        def undo(session: Session) -> None:
            repository = AuthRepository(session)
            repository.delete_refresh_tokens([rotation.new_token_id])
            repository.unspend_refresh_token(rotation.spent_token_id, spent_at)

        try:
            await self._db.run(undo)
        except Exception:
            # The new token was never shown, so it is useless; the old one stays spent: the user
            # logs in again. The 503 below says the refresh was not carried out, which holds.
            log.exception("a refresh the audit log refused could not be undone")

    async def _forget_tokens(self, *token_ids: str) -> None:
        try:
            await self._db.run(lambda s: AuthRepository(s).delete_refresh_tokens(list(token_ids)))
        except Exception:
            # Never shown to anyone, the tokens cannot be used; they only take space.
            log.exception("refresh tokens the audit log refused could not be deleted")

    async def _record_quietly(
        self, user: Identity, action: str, outcome: str, details: dict[str, Any] | None
    ) -> None:
        """Record a follow-up entry if the audit log takes it (the request fails either way)."""
        try:
            await self._events.record(user, action, outcome, details)
        except DomainError:
            log.warning("a follow-up audit entry could not be written", extra={"action": action})

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

    async def identify_access_token(self, token: str) -> Identity | Refusal | None:
        """The token's user while its session lasts; a Refusal when its session was revoked (or it
        names none); None when the token is not valid (forged, expired, or its user or session is
        unknown). One indexed read of the database per call, nothing cached: a revocation committed
        by any replica is refused by every replica's next check."""
        try:
            claims = self._access_tokens.verify(token)
        except InvalidToken:
            return None
        session_id = claims.session_id
        if session_id is None:
            return Refusal(SESSIONLESS_TOKEN)
        state = await self._db.run(lambda s: AuthRepository(s).session_state(claims.user_id, session_id))
        if state is None or not state.known:
            return None
        if state.revoked:
            return Refusal(SESSION_REVOKED)
        return Identity(user_id=state.user_id, email=state.email)

    def _start_refresh_family(self, repository: AuthRepository, user_id: str) -> tuple[str, str, str]:
        """Open a session: its first refresh token. Returns the token's id, the token, the session id."""
        family_id = str(uuid.uuid4())
        token_id, token = self._issue_refresh_token(repository, user_id, family_id, utc_now())
        return token_id, token, family_id

    def _issue_refresh_token(
        self, repository: AuthRepository, user_id: str, family_id: str, now: datetime
    ) -> tuple[str, str]:
        """Store a new token of the family; returns its id and the token itself."""
        token = new_refresh_token()
        token_id = str(uuid.uuid4())
        repository.add_refresh_token(
            RefreshToken(
                id=token_id,
                family_id=family_id,
                user_id=user_id,
                token_digest=refresh_token_digest(token),
                created_at=now,
                expires_at=now + self._refresh_ttl,
            )
        )
        return token_id, token

    def _credentials(self, user: UserView, api_key: str, refresh_token: str, session_id: str) -> Credentials:
        return Credentials(
            access_token=self._access_tokens.issue(user.id, user.email, session_id=session_id),
            refresh_token=refresh_token,
            api_key=api_key,
            expires_in=self._access_tokens.ttl_seconds,
            user=user,
        )
