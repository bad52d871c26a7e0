"""Every auth path and refusal, through Envoy with plain HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import json
import statistics
import time
from datetime import datetime

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from services.auth.tokens import AccessTokens
from services.platform.identity import Identity, IdentitySigner, generate_private_key_pem
from tests.integration.conftest import PASSWORD, RFC3339, data_dir_of, error_message, new_email

# --- register -------------------------------------------------------------------------------------


def test_register_answers_201_with_credentials(client: httpx.Client) -> None:
    email = new_email("Mixed-Case")
    response = client.post("/api/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"token", "refreshToken", "apiKey", "expiresIn", "user"}
    assert body["apiKey"].startswith("po_") and body["refreshToken"].startswith("rt_")
    assert body["expiresIn"] == 900
    assert body["user"]["email"] == email.lower()
    assert RFC3339.match(body["user"]["createdAt"])
    assert jwt.get_unverified_header(body["token"])["alg"] == "EdDSA"


def test_register_refuses_a_taken_email_whatever_its_case(client: httpx.Client, user: dict) -> None:
    response = client.post(
        "/api/register", json={"email": user["user"]["email"].upper(), "password": PASSWORD}
    )
    assert error_message(response, 409, 6) == "a user with this email already exists"


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "", "two@@example.com", "spa ce@example.com"])
def test_register_refuses_a_malformed_email(client: httpx.Client, email: str) -> None:
    response = client.post("/api/register", json={"email": email, "password": PASSWORD})
    assert "valid address" in error_message(response, 400, 3)


@pytest.mark.parametrize(
    ("password", "reason"),
    [("short", "at least 10"), ("password123", "too common"), ("zzzzzzzzzzzz", "different characters")],
)
def test_register_refuses_a_weak_password(client: httpx.Client, password: str, reason: str) -> None:
    email = new_email()
    response = client.post("/api/register", json={"email": email, "password": password})
    assert reason in error_message(response, 400, 3)
    # Nothing was created: the same email registers fine with a good password.
    assert client.post("/api/register", json={"email": email, "password": PASSWORD}).status_code == 201


def test_register_refuses_json_that_is_not_the_schema(client: httpx.Client) -> None:
    response = client.post(
        "/api/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "Traceback" not in response.text


# --- login ----------------------------------------------------------------------------------------


def test_login_returns_the_same_api_key_and_new_tokens(client: httpx.Client, user: dict) -> None:
    response = client.post("/api/login", json={"email": user["user"]["email"].upper(), "password": PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["apiKey"] == user["apiKey"]
    assert body["user"] == user["user"]
    assert body["refreshToken"] != user["refreshToken"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "email is required to log in"),
        ({"email": "  ", "password": PASSWORD}, "email is required to log in"),
        ({"email": "someone@example.com"}, "password is required to log in"),
        ({"email": "someone@example.com", "password": ""}, "password is required to log in"),
    ],
    ids=["nothing", "blank email", "no password", "empty password"],
)
def test_login_without_a_field_is_400_naming_it(client: httpx.Client, body: dict, message: str) -> None:
    assert error_message(client.post("/api/login", json=body), 400, 3) == message


def test_login_refusals_are_identical_for_wrong_password_and_unknown_email(
    client: httpx.Client, user: dict
) -> None:
    def attempt(email: str) -> tuple[str, float]:
        started = time.perf_counter()
        response = client.post("/api/login", json={"email": email, "password": "wrong horse battery"})
        elapsed = time.perf_counter() - started
        return error_message(response, 401, 16), elapsed

    # Interleaved, so that load from elsewhere on the machine weighs on both alike.
    pairs = [(attempt(user["user"]["email"]), attempt(new_email("nobody"))) for _ in range(5)]
    wrong_password = [known for known, _ in pairs]
    unknown_email = [unknown for _, unknown in pairs]
    assert {m for m, _ in wrong_password} == {m for m, _ in unknown_email} == {"invalid email or password"}
    known = statistics.median(t for _, t in wrong_password)
    unknown = statistics.median(t for _, t in unknown_email)
    # Both pay for one Argon2id verification; without the dummy hash the unknown email would be ~10x faster.
    assert 0.4 < unknown / known < 2.5, (known, unknown)


# --- verify ---------------------------------------------------------------------------------------


def test_verify_by_api_key_and_by_bearer_token(client: httpx.Client, user: dict) -> None:
    expected = {"valid": True, **user["user"]}
    by_key = client.post("/api/verify", headers={"x-api-key": user["apiKey"]}, json={})
    by_token = client.post("/api/verify", headers={"authorization": f"Bearer {user['token']}"}, json={})
    assert by_key.status_code == by_token.status_code == 200
    assert by_key.json() == by_token.json() == expected


def test_verify_without_credentials_is_401(client: httpx.Client) -> None:
    assert "missing credentials" in error_message(client.post("/api/verify", json={}), 401, 16)


def test_verify_with_an_unknown_api_key_is_401(client: httpx.Client) -> None:
    response = client.post("/api/verify", headers={"x-api-key": "po_not-a-real-key"}, json={})
    assert error_message(response, 401, 16) == "invalid credentials: no such API key (x-api-key)"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _forgeries(user: dict, mesh_access_key: bytes) -> dict[str, str]:
    header, payload, signature = user["token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    other_claims = {**claims, "sub": "00000000-0000-0000-0000-000000000000"}
    return {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "another key": AccessTokens(generate_private_key_pem(), 900).issue(
            claims["sub"], claims["email"], session_id=claims["sid"]
        ),
        "changed payload": f"{header}.{_b64(other_claims)}.{signature}",
        "expired": AccessTokens(mesh_access_key, 900).issue(
            claims["sub"], claims["email"], session_id=claims["sid"], now=time.time() - 3600
        ),
        "HS256": jwt.encode(claims, "a-guessable-shared-secret-long-enough", algorithm="HS256"),
        "garbage": "not.a.jwt",
    }


def test_forged_and_expired_access_tokens_are_refused(client: httpx.Client, user: dict, mesh) -> None:
    access_key = (data_dir_of(mesh) / "keys" / "access-token.key").read_bytes()
    for name, token in _forgeries(user, access_key).items():
        response = client.post("/api/verify", headers={"authorization": f"Bearer {token}"}, json={})
        assert response.status_code == 401, (name, response.text)
        assert response.json()["message"].startswith("invalid credentials: the access token"), name


def test_a_client_supplied_identity_assertion_is_ignored(client: httpx.Client, user: dict, mesh) -> None:
    # Even one signed with the mesh's real identity key: the edge strips it and asserts its own.
    real_key = (data_dir_of(mesh) / "keys" / "identity.key").read_bytes()
    other = IdentitySigner(real_key).sign(Identity("someone-else", "else@example.com"))
    forged = IdentitySigner(generate_private_key_pem()).sign(
        Identity(user["user"]["id"], user["user"]["email"])
    )
    alone = client.post("/api/verify", headers={"x-pythonon-identity": forged}, json={})
    assert error_message(alone, 401, 16).startswith("missing credentials")
    mixed = client.post(
        "/api/verify", headers={"x-pythonon-identity": other, "x-api-key": user["apiKey"]}, json={}
    )
    assert mixed.status_code == 200 and mixed.json()["id"] == user["user"]["id"]


# --- refresh --------------------------------------------------------------------------------------


def test_refresh_rotates_and_reuse_revokes_the_family(client: httpx.Client, user: dict) -> None:
    first = user["refreshToken"]
    rotated = client.post("/api/refresh", json={"refreshToken": first})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["refreshToken"]
    assert second != first and rotated.json()["apiKey"] == user["apiKey"]
    verify = client.post(
        "/api/verify", headers={"authorization": f"Bearer {rotated.json()['token']}"}, json={}
    )
    assert verify.status_code == 200

    # Another session (a separate login) is a separate family and must survive the revocation.
    other_session = client.post(
        "/api/login", json={"email": user["user"]["email"], "password": PASSWORD}
    ).json()

    replay = client.post("/api/refresh", json={"refreshToken": first})
    assert "already used" in error_message(replay, 401, 16)
    # The replay revoked the family: the legitimately rotated token no longer works either.
    assert error_message(client.post("/api/refresh", json={"refreshToken": second}), 401, 16)
    assert (
        client.post("/api/refresh", json={"refreshToken": other_session["refreshToken"]}).status_code == 200
    )


SESSION_REVOKED = {
    "code": 16,
    "message": "invalid credentials: the access token's session has been revoked; log in again at /api/login",
    "details": [],
}


def test_refresh_token_reuse_refuses_the_sessions_access_tokens_at_once(
    client: httpx.Client, user: dict
) -> None:
    """The attack: a stolen refresh token is used, the theft is detected on reuse, and from then on
    neither the access token of before the rotation nor the one it issued works (not 15 minutes
    later: at once), while a separate session of the same user goes on."""

    def secrets(token: str) -> httpx.Response:
        return client.get("/api/v1/secrets", headers={"authorization": f"Bearer {token}"})

    other_session = client.post(
        "/api/login", json={"email": user["user"]["email"], "password": PASSWORD}
    ).json()
    first_token, first_refresh = user["token"], user["refreshToken"]
    rotated = client.post("/api/refresh", json={"refreshToken": first_refresh})
    assert rotated.status_code == 200, rotated.text
    second_token = rotated.json()["token"]
    assert secrets(first_token).status_code == secrets(second_token).status_code == 200

    replay = client.post("/api/refresh", json={"refreshToken": first_refresh})
    assert error_message(replay, 401, 16) == (
        "refresh token was already used; its session has been revoked, log in again"
    )
    for token in (first_token, second_token):
        refused = secrets(token)
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"].startswith("application/json")
        assert refused.json() == SESSION_REVOKED
        verify = client.post("/api/verify", headers={"authorization": f"Bearer {token}"}, json={})
        assert verify.status_code == 401 and verify.json() == SESSION_REVOKED

    assert secrets(other_session["token"]).status_code == 200
    assert client.post("/api/verify", headers={"x-api-key": user["apiKey"]}, json={}).status_code == 200


def test_an_access_token_that_names_no_session_is_refused_with_the_reason(
    client: httpx.Client, user: dict, mesh
) -> None:
    """A token signed with the mesh's real key in the form issued before tokens named their session
    (no `sid`): its session cannot be checked, so it is refused; its refresh token still works."""
    access_key = (data_dir_of(mesh) / "keys" / "access-token.key").read_bytes()
    claims = jwt.decode(user["token"], options={"verify_signature": False})
    claims.pop("sid", None)
    legacy = jwt.encode(claims, serialization.load_pem_private_key(access_key, None), algorithm="EdDSA")
    response = client.get("/api/v1/secrets", headers={"authorization": f"Bearer {legacy}"})
    assert error_message(response, 401, 16) == (
        "invalid credentials: the access token names no session (issued before sessions were "
        "checked); get a new one at /api/refresh or log in again at /api/login"
    )
    renewed = client.post("/api/refresh", json={"refreshToken": user["refreshToken"]})
    assert renewed.status_code == 200, renewed.text
    again = client.get("/api/v1/secrets", headers={"authorization": f"Bearer {renewed.json()['token']}"})
    assert again.status_code == 200, again.text


def test_refresh_with_an_unknown_token_is_401(client: httpx.Client) -> None:
    response = client.post("/api/refresh", json={"refreshToken": "rt_nope"})
    assert error_message(response, 401, 16) == "invalid refresh token"


def test_created_at_is_a_timestamp(user: dict) -> None:
    datetime.fromisoformat(user["user"]["createdAt"].replace("Z", "+00:00"))
