"""Identity assertions: short-lived EdDSA JWTs that the auth service signs at the edge and every
service verifies locally, so no service trusts a header it cannot check."""

from __future__ import annotations

import contextvars
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

AUDIENCE = "mesh"
ISSUER = "pythonon-auth"
ALGORITHM = "EdDSA"
ASSERTION_LIFETIME_SECONDS = 60


class InvalidIdentity(Exception):
    """The assertion is missing, forged, expired or meant for someone else."""


@dataclass(frozen=True)
class Identity:
    """The end user a request acts for."""

    user_id: str
    email: str


@dataclass(frozen=True)
class RequestScope:
    """Facts about the request in hand that the edge vouches for."""

    identity: Identity | None
    request_id: str
    client_ip: str
    # The verified assertion itself, forwarded on internal calls made for this request.
    assertion: str = ""


current_request: contextvars.ContextVar[RequestScope] = contextvars.ContextVar("current_request")


def request_scope() -> RequestScope:
    """The scope of the request being served (set by the request interceptor)."""
    return current_request.get(RequestScope(identity=None, request_id="", client_ip=""))


ANONYMOUS = Identity(user_id="anonymous", email="")


def require_identity() -> Identity:
    """The verified end user of the request in hand; the interceptor guarantees one on non-public calls."""
    identity = request_scope().identity
    if identity is None:
        raise InvalidIdentity("no verified identity for this request")
    return identity


def generate_private_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(private_key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class IdentitySigner:
    """Signs identity assertions (held by the auth service only)."""

    def __init__(self, private_key_pem: bytes) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the identity key must be an Ed25519 private key")
        self._key = key

    def sign(self, identity: Identity, *, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": identity.user_id,
            "email": identity.email,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)


class IdentityVerifier:
    """Verifies identity assertions with the auth service's public key; the algorithm is pinned."""

    def __init__(self, public_key_pem: bytes) -> None:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the identity public key must be an Ed25519 public key")
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> IdentityVerifier:
        return cls(path.read_bytes())

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
                leeway=5,
            )
        except jwt.PyJWTError as error:
            raise InvalidIdentity(f"identity assertion refused: {error}") from None
        return Identity(user_id=str(claims["sub"]), email=str(claims.get("email", "")))
