"""Malformed input thrown at every REST path through the real edge of a whole mesh (hypothesis):
wrong types, unknown fields, huge numbers, nested junk, invalid UTF-8, text that is not JSON, odd
query strings and path segments. No answer is a 5xx other than the designed ones (501 for a
section not built in this version; 503 from generate on a mesh without ANTHROPIC_API_KEY, which it
answers before anything else), and no error says anything in protobuf's, Envoy's or
Python's words.

Bounded in time: 400 requests per database backend (about ten seconds each)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import config, rest_contract
from services.platform.service_graph import built_services

INTERNAL = re.compile(
    r"google\.protobuf|googleapis|TYPE_[A-Z]|\bproto(buf)?\b|Envoy|envoy|<class|Traceback|Error'|grpc_"
    # Python's own exception names, bare ("ValueError: ..."), as str(exception) would spell them
    r"|\b(Value|Type|Key|Attribute|Index|Runtime|Overflow|Assertion|Unicode(De|En)code|Decode|Operational"
    r"|Integrity|Lookup|OS|Recursion|ZeroDivision)Error\b|\bException\b"
)
_FILES = config._load(config.DESCRIPTOR_SET).file
ROUTES = rest_contract.routes(_FILES, [service.full_name for service in config.services()])
SCHEMAS = rest_contract.schemas(_FILES, sorted({route.input_type for route in ROUTES}))
BUILT = {f"pythonon.{node.name}." for node in built_services()}


def fields_of(route: rest_contract.RestRoute) -> list[str]:
    """The JSON names a client may (or may think it may) send to this call."""
    names = [str(spec["json"]) for spec in SCHEMAS[route.input_type].fields]
    return names + [str(spec["proto"]) for spec in SCHEMAS[route.input_type].fields] + ["name", "id", "lang"]


def is_built(route: rest_contract.RestRoute) -> bool:
    return any(route.input_type.startswith(prefix) for prefix in BUILT)


# JSON values of every type, nested a few levels.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
# Raw JSON number texts that no double or integer field can hold, or that parsers disagree on.
ODD_NUMBERS = st.sampled_from(
    [
        "1e400",
        "-1e400",
        "123456789012345678901234567890",
        "1.7976931348623157e309",
        "-0",
        "1E5",
        "0.0000001e-400",
    ]
)


@st.composite
def bodies(draw: st.DrawFn, route: rest_contract.RestRoute) -> bytes:
    """One malformed (or, now and then, well-formed) body for `route`."""
    keys = st.sampled_from(fields_of(route)) | st.text(max_size=12)
    kind = draw(
        st.sampled_from(["object", "odd-number", "any-json", "bytes", "text", "deep", "bad-utf8", "empty"])
    )
    if kind == "object":
        value = draw(st.dictionaries(keys, VALUES, max_size=5))
        return json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "odd-number":
        return f'{{"{draw(st.sampled_from(fields_of(route)))}": {draw(ODD_NUMBERS)}}}'.encode()
    if kind == "any-json":
        return json.dumps(draw(VALUES)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "text":
        return draw(st.text(max_size=64)).encode("utf-8", "surrogatepass")
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=200))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return f'{{"{draw(st.sampled_from(fields_of(route)))}": {opener * depth}1{closer * depth}}}'.encode()
    if kind == "bad-utf8":
        junk = draw(st.binary(min_size=1, max_size=16))
        return b'{"' + draw(st.sampled_from(fields_of(route))).encode() + b'": "' + junk + b'"}'
    return b""


QUERY_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=16)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    route = draw(st.sampled_from(ROUTES))
    path = route.template
    for variable in route.variables:
        segment = draw(st.sampled_from(["TOKEN", "API_KEY%0A", "%FF", "%zz", "a%2Fb", "x" * 70]) | QUERY_TEXT)
        path = path.replace(f"{{{variable}}}", quote(segment, safe="%") or "x")
    if draw(st.integers(0, 3)) == 0:
        pairs = draw(
            st.lists(
                st.tuples(st.sampled_from(fields_of(route)) | QUERY_TEXT, QUERY_TEXT | ODD_NUMBERS),
                max_size=3,
            )
        )
        path += "?" + "&".join(f"{quote(name, safe='')}={quote(value, safe='%')}" for name, value in pairs)
    body = draw(bodies(route)) if route.body else b""
    method = (
        route.method
        if draw(st.integers(0, 9))
        else draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    )
    headers = {"content-type": draw(st.sampled_from(["application/json", "text/plain"]))}
    if draw(st.integers(0, 9)) == 0:
        headers["x-request-id"] = draw(
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=200)
        )
    return method, path, body, headers


def route_of(path: str) -> rest_contract.RestRoute | None:
    for route in ROUTES:
        if re.fullmatch(re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(route.template)), path.split("?")[0]):
            return route
    return None


def check(response: httpx.Response, method: str, path: str, body: bytes, sent_id: str | None = None) -> None:
    route = route_of(path)
    designed = (response.status_code == 501 and route is not None and not is_built(route)) or (
        response.status_code == 503
        and path.split("?")[0] == "/api/v1/generate"
        and "generation is not configured: set ANTHROPIC_API_KEY" in response.text
    )
    assert response.status_code < 500 or designed, (method, path, body, response.status_code, response.text)
    # The client's id comes back as sent (a malformed one with a 400); otherwise a generated one.
    echoed = response.headers.get("x-request-id")
    assert echoed == sent_id if sent_id else echoed, (method, path, sent_id, echoed)
    if response.status_code < 400:
        return  # a run's output may hold anything the code printed
    assert response.headers["content-type"] == "application/json", response.text
    answer = response.json()
    assert set(answer) == {"code", "message", "details"}, response.text
    leak = INTERNAL.search(answer["message"])
    # An echoed name or value the client sent may contain anything; nothing else may.
    sent = body.decode("utf-8", "replace") + path
    assert leak is None or leak.group(0) in sent, (method, path, body, response.text)


FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)


@FUZZ
@given(request=requests(), with_key=st.integers(0, 4))
def test_malformed_requests_get_a_4xx_in_plain_words(
    client: httpx.Client, user: dict, request: tuple[str, str, bytes, dict[str, str]], with_key: int
) -> None:
    method, path, body, headers = request
    if with_key:
        headers = {**headers, "x-api-key": user["apiKey"]}
    response = client.request(method, path, content=body, headers=headers)
    check(response, method, path, body, headers.get("x-request-id"))
