"""The mistakes of issue 10, tried as a new user would through the whole mesh: each answered with a
precise 4xx in one spelling, none a 5xx, nothing internal in any answer; the request id echoed and
recorded in the audit entry."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from tests.integration.conftest import PASSWORD, error_message, new_email

INTERNAL = re.compile(
    r"google\.protobuf|googleapis|TYPE_[A-Z]|\bproto(buf)?\b|Envoy|envoy|<class|Traceback|Error'"
)
CHALLENGE = 'Bearer realm="pyth-on", ApiKey realm="pyth-on", header="x-api-key"'
EXECUTE_FIELDS = "(the fields are code, language, stdin, timeout, env, secrets)"


def refusal(response: httpx.Response, status: int = 400, code: int = 3) -> str:
    """The message of an error in the one spelling, with nothing internal in it."""
    message = error_message(response, status, code)
    assert response.text == json.dumps(
        {"code": code, "message": message, "details": []}, separators=(",", ":")
    )
    assert not INTERNAL.search(response.text), response.text
    assert response.headers["x-request-id"]
    return message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"lang": "javascript", "code": "console.log(1)"}, f'unknown field "lang" {EXECUTE_FIELDS}'),
        ({"code": "print(1)", "timeout_ms": 500}, f'unknown field "timeout_ms" {EXECUTE_FIELDS}'),
        (
            {"code": "print(1)", "env": ["A=1"]},
            'env: expected an object of strings such as {"NAME": ...}, got an array',
        ),
        ({"code": "print(1)", "env": {"A": {"b": 1}}}, "env.A: expected a string, got an object"),
        ({"code": "print(1)", "timeout": "10s"}, 'timeout: expected a number, got "10s"'),
    ],
    ids=["unknown-field", "timeout_ms", "env-list", "env-nested", "timeout-string"],
)
def test_execute_mistakes_are_400s_naming_the_field(
    client: httpx.Client, user: dict, body: dict, message: str
) -> None:
    response = client.post("/api/v1/execute", json=body, headers={"x-api-key": user["apiKey"]})
    assert refusal(response) == message


def test_audit_query_with_a_date_only_timestamp(client: httpx.Client, user: dict) -> None:
    response = client.get(
        "/api/v1/audit", params={"since": "2026-12-01"}, headers={"x-api-key": user["apiKey"]}
    )
    assert refusal(response) == (
        'since: expected an RFC 3339 timestamp such as "2026-12-01T00:00:00Z", got "2026-12-01"'
    )


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/register", "POST"),
        ("DELETE", "/api/v1/secrets", "GET"),
        ("GET", "/api/v1/execute", "POST"),
    ],
)
def test_a_wrong_method_is_405_with_allow(
    client: httpx.Client, user: dict, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path, headers={"x-api-key": user["apiKey"]})
    assert refusal(response, 405, 12) == f"{method} {path}: method not allowed; this path takes {allow}"
    assert response.headers["allow"] == allow


def test_an_api_key_sent_as_a_bearer_token_is_told_where_it_goes(client: httpx.Client, user: dict) -> None:
    response = client.get("/api/v1/secrets", headers={"authorization": f"Bearer {user['apiKey']}"})
    assert "goes in the x-api-key header" in refusal(response, 401, 16)
    assert response.headers["www-authenticate"] == CHALLENGE
    missing = client.get("/api/v1/secrets")
    assert refusal(missing, 401, 16).startswith("missing credentials: send x-api-key")
    assert missing.headers["www-authenticate"] == CHALLENGE


def test_names_with_a_trailing_newline_are_refused(client: httpx.Client, user: dict) -> None:
    key = {"x-api-key": user["apiKey"]}
    secret = client.put("/api/v1/secrets/API_KEY%0A", json={"value": "x"}, headers=key)
    assert refusal(secret).startswith("a secret name must be an environment-variable name")
    run = client.post("/api/v1/execute", json={"code": "print(1)", "secrets": ["API_KEY\n"]}, headers=key)
    assert refusal(run).startswith("secrets: a secret name must be an environment-variable name")


@pytest.mark.parametrize(
    "email", ["a\x00b@example.com", "a\x1b[31mb@example.com", "ab\x7f@example.com", "a\x9b31mb@example.com"]
)
def test_emails_with_control_characters_are_refused(client: httpx.Client, email: str) -> None:
    response = client.post("/api/register", json={"email": email, "password": PASSWORD})
    assert refusal(response) == "email must be a valid address such as name@example.com"


def test_every_error_has_one_spelling(client: httpx.Client, user: dict) -> None:
    key = {"x-api-key": user["apiKey"]}
    answers = [
        client.get("/api/v1/secrets"),  # the auth service's ext_authz denial
        client.delete("/api/v1/secrets/NO_SUCH_SECRET", headers=key),  # a service's gRPC error
        client.post("/api/register", json={"email": user["user"]["email"], "password": PASSWORD}),  # 409
        client.get("/no/such/path"),  # Envoy's own reply
        client.post("/api/v1/execute", json={"code": 1}, headers=key),  # the edge's check
        client.post("/api/v1/execute", json={}, headers=key),  # the executor's validation
    ]
    assert [response.status_code for response in answers] == [401, 404, 409, 404, 400, 400]
    for response in answers:
        refusal(response, response.status_code, response.json()["code"])


def test_the_request_id_is_echoed_and_recorded_in_the_audit_entry(client: httpx.Client) -> None:
    request_id = f"abc-123-{uuid.uuid4().hex[:8]}"
    registered = client.post(
        "/api/register",
        json={"email": new_email(), "password": PASSWORD},
        headers={"x-request-id": request_id},
    )
    assert registered.status_code == 201 and registered.headers["x-request-id"] == request_id
    key = {"x-api-key": registered.json()["apiKey"]}
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    run = client.post("/api/v1/execute", json={"code": "print(1)"}, headers={**key, "x-request-id": run_id})
    assert run.status_code == 200 and run.headers["x-request-id"] == run_id
    entries = client.get("/api/v1/audit", headers=key).json()["entries"]
    by_action = {entry["action"]: entry["requestId"] for entry in entries}
    assert by_action == {"auth.register": request_id, "executor.execute": run_id}
    # Errors echo it too; a generated one when the client sends none.
    denied = client.get("/api/v1/secrets", headers={"x-request-id": "abc-123"})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f-]{36}", client.get("/health").headers["x-request-id"])
