"""Access tokens (EdDSA JWTs, algorithm pinned) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ISSUER = "pythonon-auth"
AUDIENCE = "pythonon-api"
ALGORITHM = "EdDSA"
REFRESH_PREFIX = "rt_"


class InvalidToken(Exception):
    pass


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    email: str
    # The session (refresh-token family) the token was issued for; None for a token issued before
    # tokens carried one (the edge check refuses those).
    session_id: str | None


class AccessTokens:
    """Signs and verifies access tokens with the service's own Ed25519 key."""

    def __init__(self, private_key_pem: bytes, ttl_seconds: int) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the access-token key must be an Ed25519 private key")
        self._private = key
        self._public = key.public_key()
        self.ttl_seconds = ttl_seconds

    def issue(self, user_id: str, email: str, *, session_id: str, now: float | None = None) -> str:
        """A token of the user's session `session_id` (its refresh-token family), as claim `sid`."""
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user_id,
            "email": email,
            "sid": session_id,
            "typ": "access",
            "iat": issued,
            "exp": issued + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._private, algorithm=ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """Refuses any other algorithm (including `none`), key, audience, or an expired token."""
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.PyJWTError as error:
            raise InvalidToken(str(error)) from None
        if claims.get("typ") != "access":
            raise InvalidToken("not an access token")
        session_id = claims.get("sid")
        if session_id is not None and not isinstance(session_id, str):
            raise InvalidToken("sid is not a string")
        return AccessClaims(
            user_id=str(claims["sub"]), email=str(claims.get("email", "")), session_id=session_id or None
        )


def new_refresh_token() -> str:
    return REFRESH_PREFIX + secrets.token_urlsafe(32)


def refresh_token_digest(token: str) -> str:
    # The token carries 256 random bits, so a plain hash is enough to make the stored form useless.
    return hashlib.sha256(token.encode()).hexdigest()
