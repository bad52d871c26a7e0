"""Access tokens and identity assertions refuse every forgery (unit level; the edge tests repeat
the important ones through Envoy)."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from services.auth.tokens import AccessTokens, InvalidToken
from services.platform.identity import (
    Identity,
    IdentitySigner,
    IdentityVerifier,
    InvalidIdentity,
    generate_private_key_pem,
    public_key_pem,
)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture()
def tokens() -> AccessTokens:
    return AccessTokens(generate_private_key_pem(), ttl_seconds=900)


def test_a_fresh_token_verifies(tokens: AccessTokens) -> None:
    claims = tokens.verify(tokens.issue("user-1", "a@example.com", session_id="session-1"))
    assert (claims.user_id, claims.email, claims.session_id) == ("user-1", "a@example.com", "session-1")


def test_alg_none_is_refused(tokens: AccessTokens) -> None:
    genuine = tokens.issue("user-1", "a@example.com", session_id="session-1")
    payload = genuine.split(".")[1]
    forged = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}."
    with pytest.raises(InvalidToken):
        tokens.verify(forged)


def test_hs256_with_the_public_key_as_secret_is_refused(tokens: AccessTokens) -> None:
    claims = {
        "sub": "user-1",
        "aud": "pythonon-api",
        "iss": "pythonon-auth",
        "typ": "access",
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
    }
    forged = jwt.encode(claims, "some-shared-secret-of-32-bytes-or-more!", algorithm="HS256")
    with pytest.raises(InvalidToken):
        tokens.verify(forged)


def test_another_key_is_refused(tokens: AccessTokens) -> None:
    other = AccessTokens(generate_private_key_pem(), ttl_seconds=900)
    with pytest.raises(InvalidToken):
        tokens.verify(other.issue("user-1", "a@example.com", session_id="session-1"))


def test_a_changed_payload_is_refused(tokens: AccessTokens) -> None:
    header, payload, signature = tokens.issue("user-1", "a@example.com", session_id="session-1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "user-2"
    with pytest.raises(InvalidToken):
        tokens.verify(f"{header}.{_b64(claims)}.{signature}")


def test_an_expired_token_is_refused(tokens: AccessTokens) -> None:
    expired = tokens.issue("user-1", "a@example.com", session_id="session-1", now=time.time() - 3600)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(expired)


def test_an_identity_assertion_is_not_an_access_token(tokens: AccessTokens) -> None:
    key = generate_private_key_pem()
    assertion = IdentitySigner(key).sign(Identity("user-1", "a@example.com"))
    with pytest.raises(InvalidToken):
        tokens.verify(assertion)


def test_identity_assertions_verify_and_expire() -> None:
    key = generate_private_key_pem()
    signer, verifier = IdentitySigner(key), IdentityVerifier(public_key_pem(key))
    assert verifier.verify(signer.sign(Identity("u", "e@example.com"))) == Identity("u", "e@example.com")
    with pytest.raises(InvalidIdentity):
        verifier.verify(signer.sign(Identity("u", "e@example.com"), now=time.time() - 120))
    with pytest.raises(InvalidIdentity):
        verifier.verify(IdentitySigner(generate_private_key_pem()).sign(Identity("u", "e@example.com")))
    with pytest.raises(InvalidIdentity):
        verifier.verify("")
