"""A precise answer for every mistake, from the edge itself: a real Envoy with the rendered config in
front of the gRPC doubles (tests/edge/conftest.py).

Each mistake is answered by the edge's Lua filter before the call reaches a service (the doubles
record nothing), with a 400 that names the field and the form it expects, or a 405 with Allow;
every error, whoever made it, comes back in one spelling; the request id goes both ways.
"""

from __future__ import annotations

import json
import re
import time

import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from edge import config, rest_contract
from services.audit.audit_log import MAX_REQUEST_ID_LENGTH as AUDIT_REQUEST_ID_LENGTH

KEY = {"x-api-key": "po_a-key-the-double-accepts"}
# What no answer may contain: protobuf's, Envoy's or Python's wording.
INTERNAL = re.compile(
    r"google\.protobuf|googleapis|TYPE_[A-Z]|\bproto(buf)?\b|Envoy|envoy|<class|Traceback|Error'"
)


def spelled(code: int, message: str) -> str:
    """The one spelling of every error body."""
    return json.dumps({"code": code, "message": message, "details": []}, separators=(",", ":"))


def refused(response: httpx.Response, status: int = 400, code: int = 3) -> str:
    """Assert an error in the one spelling, with nothing internal in it; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["message"]
    assert response.text == spelled(code, message)
    assert not INTERNAL.search(response.text), response.text
    return message


def send_as_written(
    client: httpx.Client, method: str, target: str, content: bytes = b"", headers: dict | None = None
) -> httpx.Response:
    """Send ``target`` byte for byte as the request target (httpx would resolve "/./" and "//x")."""
    request = client.build_request(method, "/", content=content, headers=headers)
    request.extensions["target"] = target.encode("ascii")
    return client.send(request)


def nothing_reached_a_service(doubles) -> None:
    assert doubles.auth.recorder.calls == []  # not even the credential check
    assert doubles.system.recorder.calls == []


# --- the body --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        # The new user: unknown fields used to be dropped and the code run as Python.
        (
            "/api/v1/execute",
            {"lang": "javascript", "code": "console.log(1)"},
            'unknown field "lang" (the fields are code, language, stdin, timeout, env, secrets)',
        ),
        (
            "/api/v1/execute",
            {"code": "print(1)", "timeout_ms": 500},
            'unknown field "timeout_ms" (the fields are code, language, stdin, timeout, env, secrets)',
        ),
        (
            "/api/register",
            {"email": "a@b.co", "password": "x", "name": "Ada"},
            'unknown field "name" (the fields are email, password)',
        ),
        ("/api/verify", {"anything": 1}, 'unknown field "anything": this call takes no fields'),
        # The fields listed are the body's: "name" comes from the path (and is refused in the body).
        (
            "/api/v1/zk/execute/job.py",
            {"password": "pw", "language": "bash"},
            'unknown field "language" (the fields are password, stdin, timeout, env, secrets)',
        ),
        (
            "/api/v1/zk/execute/job.py",
            {"password": "pw", "name": "x"},
            "name: given in the path; leave it out of the body",
        ),
        # Wrong types and shapes, named with the form expected.
        ("/api/v1/execute", {"code": 5}, "code: expected a string, got 5"),
        ("/api/v1/execute", {"code": "1", "timeout": "abc"}, 'timeout: expected a number, got "abc"'),
        ("/api/v1/execute", {"code": "1", "timeout": True}, "timeout: expected a number, got true"),
        (
            "/api/v1/execute",
            {"code": "1", "env": ["A=1"]},
            'env: expected an object of strings such as {"NAME": ...}, got an array',
        ),
        ("/api/v1/execute", {"code": "1", "env": {"A": {"b": 1}}}, "env.A: expected a string, got an object"),
        ("/api/v1/execute", {"code": "1", "env": {"A": None}}, "env.A: expected a string, got null"),
        ("/api/v1/execute", {"code": "1", "secrets": "API_KEY"}, 'secrets: expected an array, got "API_KEY"'),
        ("/api/v1/packages", {"packages": ["a", 1]}, "packages[1]: expected a string, got 1"),
        ("/api/v1/execute", ["print(1)"], "the request body must be a JSON object, got an array"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.startswith("/") else None,
)
def test_body_mistakes_name_the_field(client, doubles, path, body, message):
    method = "PUT" if path == "/api/v1/packages" else "POST"
    response = client.request(method, path, json=body, headers=KEY)
    assert refused(response) == message
    nothing_reached_a_service(doubles)


def test_a_required_field_must_be_given(client, doubles):
    # Fields marked (google.api.field_behavior) = REQUIRED: absent, null or with no body at all,
    # the transcoder would fill in the default (PUT /api/v1/packages: an empty list).
    for body in ("{}", '{"packages": null}', ""):
        response = client.put(
            "/api/v1/packages", content=body, headers={**KEY, "content-type": "application/json"}
        )
        assert refused(response) == "packages: required, but missing (send [] for none)", body
    assert refused(client.post("/api/v1/packages", json={}, headers=KEY)) == "package: required, but missing"
    nothing_reached_a_service(doubles)


def test_a_nested_body_is_checked_too(client, doubles):
    # PUT /api/v1/secrets/{name} takes the SecretInput as its body; "name" comes from the path.
    answers = {
        '{"valu": "x"}': 'unknown field "valu" (the fields are value, description)',
        '{"value": "x", "name": "B"}': 'unknown field "name" (the fields are value, description)',
        '{"value": ["x"]}': "value: expected a string, got an array",
        '"x"': "the request body must be a JSON object (an object with the fields value, description), got a string",
    }
    for body, message in answers.items():
        response = client.put("/api/v1/secrets/TOKEN", content=body, headers=KEY)
        assert refused(response) == message, body
    nothing_reached_a_service(doubles)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "the request body is not valid JSON: an unexpected character at byte 1"),
        (b'{"code": "1",}', "the request body is not valid JSON: a key that is not a string at byte 14"),
        (
            b'{"code": "\xff\xfe"}',
            "the request body is not valid JSON: a byte that is not UTF-8 at byte 11",
        ),
        (
            b'{"code": "\\ud800"}',
            "the request body is not valid JSON: a \\u escape of half a surrogate pair at byte 11",
        ),
        (
            b'{"code": "a\nb"}',
            "the request body is not valid JSON: a control character in a string (escape it, e.g. \\n) at byte 12",
        ),
        (
            b'{"code": "1", "code": "2"}',
            'the request body is not valid JSON: the key "code" twice in one object at byte 21',
        ),
        (
            b'{"timeout": 1e400}',
            "the request body is not valid JSON: a number too large for a double (1e400) at byte 13",
        ),
        (b'{"timeout": 012}', "the request body is not valid JSON: a number with a leading zero at byte 13"),
        (
            b'{"code": "1"} {}',
            "the request body is not valid JSON: more after the end of the value at byte 15",
        ),
        (
            b'{"secrets": ' + b"[" * 100 + b"]" * 100 + b"}",
            "the request body is not valid JSON: values nested deeper than 64 levels at byte 76",
        ),
    ],
    ids=lambda value: value.decode("utf-8", "replace")[:30] if isinstance(value, bytes) else None,
)
def test_malformed_json_says_what_and_where(client, doubles, body, message):
    response = client.post(
        "/api/v1/execute", content=body, headers={**KEY, "content-type": "application/json"}
    )
    assert refused(response) == message
    nothing_reached_a_service(doubles)


def test_a_body_near_the_cap_is_checked_whole_and_quickly(client, doubles):
    # The Lua filter holds up to the buffer filter's cap (not Envoy's 1 MiB default), and scans it
    # with compiled byte loops: an unknown field after 3 MB of code is still found.
    body = json.dumps({"code": "print('h\u00e9llo')\n" * 150_000, "lang": "python"}).encode()
    assert 3_000_000 < len(body) < 4 * 1_048_576
    started = time.monotonic()
    response = client.post("/api/v1/execute", content=body, headers=KEY)
    assert refused(response).startswith('unknown field "lang"')
    assert time.monotonic() - started < 2


def test_null_and_an_empty_body_leave_fields_at_their_defaults(client, doubles):
    # proto3 JSON: null is the default value; no body is the empty message.
    assert client.post("/api/verify", json={}, headers=KEY).status_code == 200
    assert client.post("/api/verify", headers=KEY).status_code == 200
    response = client.post("/api/register", json={"email": "ada@example.com", "password": None})
    assert response.status_code == 201
    assert doubles.auth.recorder.only("Register").request.password == ""


# --- the query and the path --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        # The since=2026-12-01 echoed type.googleapis.com/google.protobuf.Timestamp.
        (
            "since=2026-12-01",
            'since: expected an RFC 3339 timestamp such as "2026-12-01T00:00:00Z", got "2026-12-01"',
        ),
        (
            "until=2026-02-30T00:00:00Z",
            'until: expected an RFC 3339 timestamp such as "2026-12-01T00:00:00Z", got "2026-02-30T00:00:00Z"',
        ),
        ("limit=abc", 'limit: expected an integer from -2147483648 to 2147483647, got "abc"'),
        ("limit=99999999999", 'limit: expected an integer from -2147483648 to 2147483647, got "99999999999"'),
        ("limt=5", 'unknown query parameter "limt"'),
        ("limit=1&limit=2", "limit: given twice in the query"),
        ("action=%zz", "the query parameter action: malformed percent-encoding"),
        ("action=%FF", "the query parameter action: not UTF-8 once percent-decoded"),
    ],
)
def test_query_mistakes_name_the_parameter(client, doubles, query, message):
    assert refused(client.get(f"/api/v1/audit?{query}", headers=KEY)) == message
    nothing_reached_a_service(doubles)


def test_a_well_formed_query_passes(client, doubles):
    # audit is not built in this edge's upstreams: the system double answers UNIMPLEMENTED (501).
    query = "limit=5&since=2026-01-01T00:00:00.5%2B01:00&until=2026-12-31T23:59:59Z&action=auth.login"
    assert client.get(f"/api/v1/audit?{query}", headers=KEY).status_code == 501


def test_query_parameters_on_a_call_with_a_json_body_are_refused(client, doubles):
    response = client.post("/api/verify?x=1", json={}, headers=KEY)
    assert refused(response) == 'unknown query parameter "x": this call reads its fields from the JSON body'


def test_a_body_where_none_is_taken_or_only_whitespace_is_refused(client, doubles):
    # The transcoder would parse a body sent to a GET or DELETE all the same.
    for method, path in [("GET", "/api/info"), ("DELETE", "/api/v1/secrets/TOKEN")]:
        response = client.request(method, path, content=b'{"a": 1}', headers=KEY)
        assert (
            refused(response)
            == "this call takes no request body (its fields come from the path and the query)"
        )
    response = client.post("/api/login", content=b" \n", headers={"content-type": "application/json"})
    assert refused(response) == "the request body is not valid JSON: an unexpected end at byte 3"
    nothing_reached_a_service(doubles)


def test_path_variables_are_checked(client, doubles):
    assert refused(client.delete("/api/v1/secrets/TOKEN?name=OTHER", headers=KEY)) == (
        "name: given in the path; leave it out of the query"
    )
    assert refused(client.delete("/api/v1/secrets/A%FF", headers=KEY)) == (
        "name (in the path): not UTF-8 once percent-decoded"
    )
    assert refused(client.delete("/api/v1/secrets/A%4", headers=KEY)) == (
        "name (in the path): malformed percent-encoding"
    )


NUL_IN_NAME = "name (in the path): must not contain a NUL byte (%00)"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/secrets/A%00B"),
        ("DELETE", "/api/v1/zk/code/a.py%00"),
        ("DELETE", "/api/v1/packages/a%00"),
        ("PUT", "/api/v1/zk/code/%00"),
        ("POST", "/api/v1/zk/execute/a%00"),
    ],
)
def test_a_nul_byte_in_a_path_variable_is_named(client, doubles, method, path):
    # Envoy refuses %00 while normalizing the path, before any filter runs; the Lua filter words
    # that refusal from the path its local reply carries (the attack pass got "the request is
    # malformed").
    body = b"{}" if method in ("PUT", "POST") else b""
    response = send_as_written(client, method, path, body, KEY)
    assert refused(response) == NUL_IN_NAME
    nothing_reached_a_service(doubles)


def test_a_nul_byte_outside_a_path_variable_is_named_too(client, doubles):
    assert refused(client.get("/nope%00", headers=KEY)) == "the path: must not contain a NUL byte (%00)"
    nothing_reached_a_service(doubles)


# --- the path itself ---------------------------------------------------------------------------

# Every mistake of the attack pass, sent to a known path with a trailing slash: the transcoder
# would serve it as the path without one, and it skipped every check (the protobuf parser's words,
# a secret's value echoed, unknown fields accepted and the change made).
SECRET_CANARY = "ECHO-canary-5150"


@pytest.mark.parametrize(
    ("method", "path", "body", "exact"),
    [
        ("POST", "/api/v1/execute/", b"garbage{", "/api/v1/execute"),
        ("POST", "/api/v1/execute/", b'{"code": "print(1)",}', "/api/v1/execute"),
        ("POST", "/api/v1/execute/", b'{"code": "1", "env": {"A": 1}}', "/api/v1/execute"),
        ("POST", "/api/v1/execute/", b'{"code": "1", "timeout": [1]}', "/api/v1/execute"),
        ("POST", "/api/v1/execute/stream/", b"garbage{", "/api/v1/execute/stream"),
        (
            "PUT",
            "/api/v1/secrets/ECHO/",
            b'{"value":"' + SECRET_CANARY.encode() + b'" x}',
            "/api/v1/secrets/ECHO",
        ),
        ("PUT", "/api/v1/secrets/QQ/", b'{"value":"x","bogus":1}', "/api/v1/secrets/QQ"),
        ("PUT", "/api/v1/secrets/QQ//", b'{"value":"x","bogus":1}', "/api/v1/secrets/QQ"),
        ("DELETE", "/api/v1/secrets/QQ/", b"", "/api/v1/secrets/QQ"),
        (
            "POST",
            "/api/register/",
            b'{"email": "a@b.co", "password": "x", "admin": true}',
            "/api/register",
        ),
        ("GET", "/api/v1/audit/?foo=1", b"", "/api/v1/audit"),
        ("GET", "/api/v1/audit/?limit=abc", b"", "/api/v1/audit"),
        ("GET", "/api/info/", b"", "/api/info"),
        ("GET", "/health/", b"", "/health"),
        ("GET", "/api/openapi.json/", b"", "/api/openapi.json"),
        ("GET", "/docs/", b"", "/docs"),
    ],
)
def test_a_trailing_slash_is_404_and_changes_nothing(client, doubles, method, path, body, exact):
    response = send_as_written(client, method, path, body, {**KEY, "content-type": "application/json"})
    shown = path.replace("//", "/")  # Envoy merges slashes before any filter
    assert refused(response, 404, 5) == (
        f"no route for {shown} (paths are matched exactly: did you mean {exact}?)"
    )
    assert SECRET_CANARY not in response.text
    nothing_reached_a_service(doubles)  # no user created, no secret put or deleted, no run


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1//execute",
        "//api/v1/execute",
        "/api/v1/./execute",
        "/api/v1/../v1/execute",
        "/api/v1/%65xecute",
    ],
)
def test_a_path_envoy_normalizes_is_checked_as_the_path(client, doubles, path):
    response = send_as_written(client, "POST", path, b'{"code": "print(1)",}', KEY)
    assert refused(response) == "the request body is not valid JSON: a key that is not a string at byte 21"
    nothing_reached_a_service(doubles)


@pytest.mark.parametrize(
    "path",
    ["/api/v1%2Fexecute", "/API/v1/execute", "/api/v1/Execute", "/api/v1/execute;x=1", "/api/v1/execute:run"],
)
def test_any_other_spelling_of_a_path_is_404(client, doubles, path):
    response = send_as_written(client, "POST", path, b'{"code": "print(1)",}', KEY)
    assert refused(response, 404, 5) == f"no route for {path}"
    nothing_reached_a_service(doubles)


def test_the_paths_envoy_answers_itself_still_answer(client, doubles):
    assert client.get("/api/openapi.json").json()["openapi"].startswith("3.")
    assert client.get("/docs?x=1").text.startswith("<!DOCTYPE html>")
    assert client.post("/docs").status_code == 405


# --- the content type --------------------------------------------------------------------------

# Envoy's transcoder counts as gRPC only application/grpc and application/grpc+...: these are REST
# to it, and were let through unchecked by a prefix test.
NOT_GRPC = [
    "application/grpc-web",
    "application/grpcx",
    "application/grpc; charset=utf-8",
    "Application/GRPC",
]


@pytest.mark.parametrize("content_type", NOT_GRPC)
def test_a_content_type_that_only_starts_like_grpc_is_checked_as_rest(client, doubles, content_type):
    headers = {**KEY, "content-type": content_type}
    response = client.post("/api/v1/execute", content=b"garbage{", headers=headers)
    assert refused(response) == "the request body is not valid JSON: an unexpected character at byte 1"
    response = client.put(
        "/api/v1/secrets/API_TOKEN", content=b'{"value":"CHANGED","bogus":1}', headers=headers
    )
    assert refused(response) == 'unknown field "bogus" (the fields are value, description)'
    response = client.post(
        "/api/register", content=b'{"email": "a@b.co", "password": "x", "admin": true}', headers=headers
    )
    assert refused(response) == 'unknown field "admin" (the fields are email, password)'
    assert refused(client.delete("/api/v1/secrets/A%00B", headers=headers)) == NUL_IN_NAME
    # Envoy's own replies to it are REST ones too.
    assert refused(client.get("/nope", headers=headers), 404, 5) == "no route for /nope"
    nothing_reached_a_service(doubles)  # no secret changed, no user created, nothing run


# --- wrong methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/register", "POST"),
        ("DELETE", "/api/v1/secrets", "GET"),
        ("POST", "/api/v1/secrets/TOKEN", "PUT, DELETE"),
        ("PATCH", "/api/v1/packages", "GET, PUT, POST"),
        ("POST", "/health", "GET"),
        ("GET", "/api/v1/execute", "POST"),
    ],
)
def test_a_wrong_method_is_405_with_allow(client, doubles, method, path, allow):
    response = client.request(method, path, headers=KEY)
    message = refused(response, 405, 12)
    assert message == f"{method} {path}: method not allowed; this path takes {allow}"
    assert response.headers["allow"] == allow
    nothing_reached_a_service(doubles)


def test_allowed_methods_come_from_the_http_rules():
    files = config._load(config.DESCRIPTOR_SET).file
    found = rest_contract.routes(files, [service.full_name for service in config.services()])
    allowed = rest_contract.allowed_methods(found)
    assert allowed["/api/v1/secrets/{name}"] == ["PUT", "DELETE"]
    assert allowed["/api/v1/packages"] == ["GET", "PUT", "POST"]
    assert allowed["/api/register"] == ["POST"]


def test_unsupported_path_templates_are_refused_at_render(tmp_path):
    file = descriptor_pb2.FileDescriptorProto(name="x.proto", package="pythonon.audit.v1")
    file.message_type.add(name="E")
    method = file.service.add(name="AuditService").method.add(
        name="List", input_type=".pythonon.audit.v1.E", output_type=".pythonon.audit.v1.E"
    )
    method.options.Extensions[annotations_pb2.http].get = "/v1/{name=things/*}:list"
    with pytest.raises(ValueError, match="only {field}, {field=\\*} and {field=\\*\\*} are supported"):
        rest_contract.routes([file], ["pythonon.audit.v1.AuditService"])


# --- one spelling for every error --------------------------------------------------------------


def test_every_error_has_one_spelling(client, doubles):
    # Envoy's own reply (no route), a service's gRPC error through the transcoder, the Lua
    # filter's 400 and 405: byte for byte the same shape.
    assert client.get("/nope").text == spelled(5, "no route for /nope")
    login = client.post("/api/login", json={"email": "a@b.co", "password": "x"})
    assert (login.status_code, login.text) == (401, spelled(16, "wrong email or password"))
    assert client.post("/api/login", json={"x": 1}).text == spelled(
        3, 'unknown field "x" (the fields are email, password)'
    )
    # The auth service's denial body, spaced by Python's json.dumps.
    doubles.auth.deny(403, 7, "not yours")
    denied = client.get("/api/v1/secrets", headers=KEY)
    assert (denied.status_code, denied.text) == (403, spelled(7, "not yours"))


def test_internal_wording_from_a_service_never_reaches_the_client(client, doubles):
    def leaks(message):
        def answer(request, context):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        return answer

    doubles.auth.answer(
        "Login", leaks("Unexpected <class 'google.protobuf.message.DecodeError'>: Wire format was corrupt")
    )
    response = client.post("/api/login", json={"email": "a@b.co", "password": "x"})
    assert refused(response) == "the request is malformed"
    doubles.auth.answer("Login", leaks("email: invalid value 5 for type TYPE_STRING"))
    response = client.post("/api/login", json={"email": "a@b.co", "password": "x"})
    assert refused(response) == "email: invalid value"


# --- 401 -------------------------------------------------------------------------------------


def test_a_401_carries_a_challenge(client, doubles):
    doubles.auth.deny(
        401, 16, "missing credentials: send x-api-key: <API key> or Authorization: Bearer <access token>"
    )
    response = client.get("/api/v1/secrets")
    refused(response, 401, 16)
    assert response.headers["www-authenticate"] == config.CHALLENGE
    assert response.headers["www-authenticate"].startswith('Bearer realm="pyth-on"')
    assert 'header="x-api-key"' in response.headers["www-authenticate"]
    # A service's own 401 (a wrong password) carries it too.
    login = client.post("/api/login", json={"email": "a@b.co", "password": "x"})
    assert login.status_code == 401 and login.headers["www-authenticate"] == config.CHALLENGE


# --- the request id --------------------------------------------------------------------------


def test_the_clients_request_id_reaches_the_service_and_comes_back(client, doubles):
    response = client.get("/api/info", headers={"x-request-id": "abc-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    assert doubles.system.recorder.only("Info").metadata["x-request-id"] == "abc-123"
    assert doubles.auth.recorder.calls == []  # Info skips the check


def test_every_answer_carries_a_request_id(client, doubles):
    generated = client.get("/api/info")
    assert re.fullmatch(r"[0-9a-f-]{36}", generated.headers["x-request-id"])
    for response in [
        client.get("/nope", headers={"x-request-id": "r-404"}),
        client.get("/api/register", headers={"x-request-id": "r-405"}),
        client.post("/api/login", json={"x": 1}, headers={"x-request-id": "r-400"}),
        client.post(
            "/api/login", json={"email": "a@b.co", "password": "x"}, headers={"x-request-id": "r-401"}
        ),
    ]:
        assert response.headers["x-request-id"] == f"r-{response.status_code}"
    doubles.auth.deny(401, 16, "no")
    assert (
        client.get("/api/v1/secrets", headers={"x-request-id": "r-denied"}).headers["x-request-id"]
        == "r-denied"
    )


def test_a_path_envoy_refuses_before_any_filter_still_gets_a_request_id(client, doubles):
    response = client.get("/api/v1/secrets/A%00B", headers=KEY)
    assert refused(response) == NUL_IN_NAME
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        response.headers["x-request-id"],
    )


def test_an_empty_request_id_counts_as_none_and_a_fresh_one_is_generated(client, doubles):
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    # Refused by Envoy before any filter runs (the fuzzer's find: an empty id was echoed).
    refused_early = client.get("/api/v1/packages/%00", headers={**KEY, "x-request-id": ""})
    assert refused(refused_early) == NUL_IN_NAME
    assert re.fullmatch(uuid4, refused_early.headers["x-request-id"])
    # A call that goes through: the service sees the generated id, not an empty one.
    served = client.get("/api/info", headers={"x-request-id": ""})
    assert served.status_code == 200
    assert re.fullmatch(uuid4, served.headers["x-request-id"])
    assert doubles.system.recorder.only("Info").metadata["x-request-id"] == served.headers["x-request-id"]


def test_a_request_id_the_audit_log_cannot_hold_is_refused(client, doubles):
    assert config.MAX_REQUEST_ID_LENGTH == AUDIT_REQUEST_ID_LENGTH
    too_long = "a" * (config.MAX_REQUEST_ID_LENGTH + 1)
    message = refused(client.get("/api/info", headers={"x-request-id": too_long}))
    assert message == "x-request-id: expected 1 to 128 letters, digits or -_.:/+=, got 129 characters"
    assert refused(client.get("/api/info", headers={"x-request-id": "a b"})).startswith("x-request-id:")
    assert client.get("/api/info", headers={"x-request-id": "a" * 128}).status_code == 200


def test_native_grpc_echoes_the_request_id(edge, doubles):
    with grpc.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        _, call = system_pb2_grpc.SystemServiceStub(channel).Info.with_call(
            system_pb2.InfoRequest(), metadata=[("x-request-id", "grpc-1")], timeout=10
        )
    assert ("x-request-id", "grpc-1") in [(m.key, m.value) for m in call.initial_metadata()]
    assert doubles.system.recorder.only("Info").metadata["x-request-id"] == "grpc-1"


def test_native_grpc_with_a_request_id_the_audit_log_cannot_hold_is_invalid_argument(edge, doubles):
    with grpc.insecure_channel(f"127.0.0.1:{edge.port}") as channel, pytest.raises(grpc.RpcError) as raised:
        system_pb2_grpc.SystemServiceStub(channel).Info(
            system_pb2.InfoRequest(), metadata=[("x-request-id", "a" * 129)], timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("x-request-id: expected 1 to 128")
    assert doubles.system.recorder.calls == []


@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
def test_what_envoy_counts_as_grpc_stays_native_grpc(client, doubles, content_type):
    # Not transcoded: a REST path is no gRPC method, so Envoy answers UNIMPLEMENTED the gRPC way.
    response = client.post(
        "/api/v1/execute", content=b"garbage{", headers={**KEY, "content-type": content_type}
    )
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "12"
    assert response.headers["content-type"] == "application/grpc"
    nothing_reached_a_service(doubles)
