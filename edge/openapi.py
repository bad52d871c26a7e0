"""The OpenAPI 3.1 document of the REST API and its reference page, derived from the descriptor set.

Paths, methods, parameters and request schemas come from the same reading of the
``google.api.http`` options as the edge's request checks (``rest_contract``); which calls need a
credential from the ``pythonon.api.v1`` options, as the edge's routes; summaries and
descriptions from the proto comments (a descriptor set with source info). What the protos do not
say, the HTTP statuses a service answers besides the ones every call shares, is the small table
``_STATUSES`` below, written from the services' domain errors. ``tools/generate.py`` writes both
files next to the descriptor set; the edge serves them at ``/api/openapi.json`` and ``/docs``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from edge import rest_contract
from services.platform.service_graph import SECTIONS

DOCUMENT: Path = Path(__file__).resolve().parent / "openapi.json"
REFERENCE_PAGE: Path = Path(__file__).resolve().parent / "docs.html"
DOCUMENT_PATH = "/api/openapi.json"
REFERENCE_PATH = "/docs"

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"BearerJwt": []}]

# What each status means, whichever call answers it (DESIGN.md §1: the gRPC code it maps from).
_MEANINGS = {
    400: "The request is malformed: the message names the field (INVALID_ARGUMENT, FAILED_PRECONDITION).",
    401: "No valid API key or access token, or wrong credentials (UNAUTHENTICATED).",
    403: "Refused for this user (PERMISSION_DENIED).",
    404: "Not found (NOT_FOUND).",
    409: "Already exists (ALREADY_EXISTS).",
    413: "The request body is larger than the edge accepts.",
    429: "Too many requests: retry after the seconds in Retry-After (RESOURCE_EXHAUSTED).",
    501: "This API section is not built in this version (UNIMPLEMENTED).",
    503: "A service or dependency is unavailable: retry later (UNAVAILABLE).",
}

# Statuses a call answers besides those every call of its kind shares (400 and 503 for all; 401
# and 429 without `public`; 429 with `limit_by_client_ip`; 413 with a body), from the domain
# errors its service raises, with what they mean there.
_STATUSES: dict[str, dict[int, str]] = {
    "/pythonon.auth.v1.AuthService/Register": {409: "An account with this email exists."},
    "/pythonon.auth.v1.AuthService/Login": {401: "Wrong email or password."},
    "/pythonon.auth.v1.AuthService/Refresh": {401: "The refresh token is unknown, expired or spent."},
    "/pythonon.auth.v1.AuthService/Verify": {404: "The credential's user no longer exists."},
    "/pythonon.executor.v1.ExecutorService/Execute": {
        429: "Every run slot is taken and the wait queue is full: retry after Retry-After."
    },
    "/pythonon.secrets.v1.SecretsService/DeleteSecret": {404: "No secret of that name."},
    "/pythonon.generator.v1.GeneratorService/Generate": {
        429: "The model's rate limit: retry after Retry-After.",
        503: "Generation is not configured (no ANTHROPIC_API_KEY), or the model is unreachable.",
    },
    "/pythonon.packages.v1.PackagesService/RemovePackage": {404: "The package is not in the list."},
    "/pythonon.zk.v1.ZkService/DeleteCode": {404: "No stored code of that name."},
    "/pythonon.zk.v1.ZkService/Execute": {
        403: "Wrong password, or the payload was altered: nothing ran.",
        404: "No stored code of that name.",
        429: "Every run slot is taken and the wait queue is full: retry after Retry-After.",
    },
}

# Successful answers under another status than 200 (the service sends x-pythonon-http-status).
_SUCCESS_STATUS = {"/pythonon.auth.v1.AuthService/Register": 201}
# Answers with the call's own body under an error status: a degraded health still says what is down.
_STATUS_WITH_BODY = {
    "/pythonon.system.v1.SystemService/Health": {503: "Degraded: a service or dependency is down."}
}

# One well-formed request per call (the body, and the path's `name`): shown on /docs, and the
# first case schemathesis sends (its explicit phase), so that the fuzzing also goes past validation.
_EXAMPLES: dict[str, dict[str, Any]] = {
    "/pythonon.auth.v1.AuthService/Register": {
        "body": {"email": "ada@example.com", "password": "correct horse battery"}
    },
    "/pythonon.auth.v1.AuthService/Login": {
        "body": {"email": "ada@example.com", "password": "correct horse battery"}
    },
    "/pythonon.auth.v1.AuthService/Verify": {"body": {}},
    "/pythonon.auth.v1.AuthService/Refresh": {"body": {"refreshToken": "rt_..."}},
    "/pythonon.executor.v1.ExecutorService/Execute": {
        "body": {
            "code": "import sys\nprint('hi', sys.stdin.read())",
            "language": "python",
            "stdin": "there",
            "timeout": 5,
        }
    },
    "/pythonon.secrets.v1.SecretsService/PutSecret": {
        "name": "API_TOKEN",
        "body": {"value": "s3cr3t", "description": "the payment API's token"},
    },
    "/pythonon.secrets.v1.SecretsService/DeleteSecret": {"name": "API_TOKEN"},
    "/pythonon.generator.v1.GeneratorService/Generate": {
        "body": {"prompt": "print today's weekday", "language": "python", "execute": True, "timeout": 5}
    },
    "/pythonon.packages.v1.PackagesService/SetPackages": {"body": {"packages": ["humanize>=4", "six"]}},
    "/pythonon.packages.v1.PackagesService/AddPackage": {"body": {"package": "humanize>=4"}},
    "/pythonon.packages.v1.PackagesService/RemovePackage": {"name": "humanize"},
    "/pythonon.zk.v1.ZkService/Encrypt": {
        "body": {"code": "print('hello')", "password": "a long passphrase"}
    },
    "/pythonon.zk.v1.ZkService/PutCode": {
        "name": "hello",
        "body": {
            "payload": {
                "version": 1,
                "algorithm": "argon2id-xchacha20poly1305",
                "salt": "AAECAwQFBgcICQoLDA0ODw==",
                "nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
                "ciphertext": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJw==",
                "kdf": {"memoryKib": 19456, "iterations": 2, "parallelism": 1},
            },
            "language": "python",
        },
    },
    "/pythonon.zk.v1.ZkService/DeleteCode": {"name": "hello"},
    "/pythonon.zk.v1.ZkService/Execute": {
        "name": "hello",
        "body": {"password": "a long passphrase", "timeout": 5},
    },
}
# The streaming execute takes execute's request and answers its statuses.
_EXAMPLES["/pythonon.executor.v1.ExecutorService/ExecuteStream"] = _EXAMPLES[
    "/pythonon.executor.v1.ExecutorService/Execute"
]
_STATUSES["/pythonon.executor.v1.ExecutorService/ExecuteStream"] = _STATUSES[
    "/pythonon.executor.v1.ExecutorService/Execute"
]

_TEXT_KINDS: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "bytes": {"type": "string", "contentEncoding": "base64"},
    "bool": {"type": "boolean"},
    "double": {"type": "number"},
    "float": {"type": "number"},
    "int32": {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1},
    "uint32": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 2**32 - 1},
    # proto3 JSON prints 64-bit integers as strings (a double cannot hold them all); both are read.
    "int64": {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"},
    "uint64": {"type": ["string", "integer"], "format": "int64", "pattern": "^[0-9]+$"},
    "timestamp": {"type": "string", "format": "date-time"},
    "duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
    "fieldmask": {"type": "string"},
    "struct": {"type": "object"},
    "empty": {"type": "object"},
    "any": {"type": "object"},
    "list": {"type": "array"},
    "value": {},
}
_MAP_KEYS = {"bool": "^(true|false)$", "string": None}


def _names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Full names of the file's services, methods, messages and fields by source location path."""
    names: dict[tuple[int, ...], str] = {}

    def add_message(path: tuple[int, ...], prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        names[path] = name
        for index, field in enumerate(message.field):
            names[(*path, 2, index)] = f"{name}.{field.name}"
        for index, nested in enumerate(message.nested_type):
            add_message((*path, 3, index), name, nested)

    for index, message in enumerate(file.message_type):
        add_message((4, index), file.package, message)
    for index, service in enumerate(file.service):
        names[(6, index)] = f"{file.package}.{service.name}"
        for method_index, method in enumerate(service.method):
            names[(6, index, 2, method_index)] = f"{file.package}.{service.name}.{method.name}"
    return names


def comments(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """The leading comment of every service, method, message and field, by full name
    ("pkg.Service.Method", "pkg.Message.field"); empty without source info."""
    found: dict[str, str] = {}
    for file in files:
        names = _names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(line.strip() for line in location.leading_comments.strip().splitlines())
            if name and text:
                found[name] = text
    return found


def _summary(text: str) -> str:
    """The first sentence of a comment."""
    head, dot, _ = text.partition(". ")
    return (head + dot).strip().rstrip(".") if text else ""


class _Builder:
    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto], found: list[rest_contract.RestRoute]):
        self.comments = comments(files)
        roots = sorted({route.input_type for route in found} | {route.output_type for route in found})
        self.messages = rest_contract.schemas(files, roots)
        short = [name.rsplit(".", 1)[1] for name in self.messages]
        # Components are named by the message's own name, by its full name where two would clash.
        self.component = {
            name: name.rsplit(".", 1)[1] if short.count(name.rsplit(".", 1)[1]) == 1 else name
            for name in self.messages
        }

    def ref(self, message: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{self.component[message]}"}

    def value(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        kind = spec["kind"]
        if kind == "message":
            return self.ref(str(spec["message"]))
        if kind == "enum":
            return {"type": "string", "enum": list(spec["values"])}
        return dict(_TEXT_KINDS[kind])

    def field(self, message: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        if spec["kind"] == "map":
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.value(spec["value"])}
            if spec["key"] != "string":
                schema["propertyNames"] = {"pattern": _MAP_KEYS.get(spec["key"], "^-?[0-9]+$")}
        elif spec.get("repeated"):
            schema = {"type": "array", "items": self.value(spec)}
        else:
            schema = self.value(spec)
        description = self.comments.get(f"{message}.{spec['proto']}")
        if description:
            schema["description"] = description
        return schema

    def object(self, message: str, leave_out: Sequence[str] = ()) -> dict[str, Any]:
        properties = {
            str(spec["json"]): self.field(message, spec)
            for spec in self.messages[message].fields
            if spec["proto"] not in leave_out
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        required = [
            str(spec["json"])
            for spec in self.messages[message].fields
            if spec.get("required") and spec["proto"] not in leave_out
        ]
        if required:
            schema["required"] = required
        description = self.comments.get(message)
        if description:
            schema["description"] = description
        return schema

    def components(self) -> dict[str, Any]:
        return {self.component[name]: self.object(name) for name in sorted(self.messages)}


def _error_response(description: str, status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}}
    return response


def _operation(
    builder: _Builder, route: rest_contract.RestRoute, public: bool, limited: bool, built: bool
) -> dict[str, Any]:
    service, method = route.grpc_path.strip("/").split("/")
    comment = builder.comments.get(f"{service}.{method}", "")
    operation: dict[str, Any] = {
        "operationId": f"{service.rsplit('.', 1)[1]}_{method}",
        "summary": _summary(comment) or method,
        "description": f"{comment}\n\ngRPC: `{service}/{method}`".strip(),
        "tags": [service.split(".")[1]],
    }
    if public:
        operation["security"] = []
    example = _EXAMPLES.get(route.grpc_path, {})
    parameters = []
    for variable in route.variables:
        spec = next(s for s in builder.messages[route.input_type].fields if s["proto"] == variable)
        parameter = {
            "name": variable,
            "in": "path",
            "required": True,
            "schema": builder.field(route.input_type, spec),
        }
        if variable in example:
            parameter["example"] = example[variable]
        parameters.append(parameter)
    if route.body != "*":
        for spec in builder.messages[route.input_type].fields:
            if spec["proto"] in route.variables or spec["proto"] == route.body or spec["kind"] == "map":
                continue
            if spec["kind"] in ("message", "struct", "list", "value", "any", "empty"):
                continue  # only text forms travel in a query
            parameters.append(
                {"name": spec["json"], "in": "query", "schema": builder.field(route.input_type, spec)}
            )
    if parameters:
        operation["parameters"] = parameters
    if route.body == "*":
        body_schema = (
            builder.object(route.input_type, route.variables)
            if route.variables
            else builder.ref(route.input_type)
        )
    elif route.body:
        spec = next(s for s in builder.messages[route.input_type].fields if s["proto"] == route.body)
        body_schema = builder.field(route.input_type, spec)
    if route.body:
        media: dict[str, Any] = {"schema": body_schema}
        if "body" in example:
            media["example"] = example["body"]
        operation["requestBody"] = {"required": True, "content": {"application/json": media}}

    success = str(_SUCCESS_STATUS.get(route.grpc_path, 200))
    if route.server_streaming:
        content = {
            "application/x-ndjson": {
                "schema": {
                    **builder.ref(route.output_type),
                    "description": "One JSON object per line, each written as the call produces it.",
                }
            }
        }
        description = "A stream of newline-delimited JSON objects; an error after the first arrives in-band."
    else:
        content = {"application/json": {"schema": builder.ref(route.output_type)}}
        description = "Success."
    responses: dict[str, Any] = {success: {"description": description, "content": content}}
    for status, meaning in _STATUS_WITH_BODY.get(route.grpc_path, {}).items():
        responses[str(status)] = {"description": meaning, "content": content}

    statuses = {400: _MEANINGS[400], 503: _MEANINGS[503]}
    if not public:
        statuses.update({401: _MEANINGS[401], 429: _MEANINGS[429]})
    if limited:
        statuses[429] = "Too many requests from this client address: retry after Retry-After."
    if route.body:
        statuses[413] = _MEANINGS[413]
    if not built:
        statuses[501] = _MEANINGS[501]
    statuses.update(_STATUSES.get(route.grpc_path, {}))
    for status in sorted(statuses):
        if str(status) not in responses:
            responses[str(status)] = _error_response(statuses[status], status)
    operation["responses"] = responses
    return operation


def _edge_paths() -> dict[str, Any]:
    """The two paths the edge serves itself."""
    return {
        DOCUMENT_PATH: {
            "get": {
                "operationId": "edge_OpenApiDocument",
                "summary": "This document",
                "description": "The OpenAPI 3.1 document of the REST API, generated from the protos.",
                "tags": ["system"],
                "security": [],
                "responses": {
                    "200": {"description": "Success.", "content": {"application/json": {"schema": {}}}}
                },
            }
        },
        REFERENCE_PATH: {
            "get": {
                "operationId": "edge_ReferencePage",
                "summary": "The API reference page",
                "description": "This document rendered as one HTML page.",
                "tags": ["system"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Success.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def document(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
    services: Iterable[Any],
    *,
    version: str,
    built_sections: Iterable[str],
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST bindings of ``services`` (``edge.config.Service``)."""
    files = list(files)
    services = list(services)
    built = set(built_sections)
    # The services in the order given (the API sections' order), each in its descriptor's order.
    services.sort(key=lambda service: SECTIONS.index(service.section) if service.section in SECTIONS else 99)
    found = rest_contract.routes(files, [service.full_name for service in services])
    position = {service.full_name: index for index, service in enumerate(services)}
    found.sort(key=lambda route: position[route.grpc_path.strip("/").split("/")[0]])
    builder = _Builder(files, found)
    public = set().union(*(service.public for service in services))
    limited = set().union(*(service.limit_by_client_ip for service in services))
    section_of = {service.full_name: service.section for service in services}

    paths: dict[str, dict[str, Any]] = {}
    for route in found:
        service = route.grpc_path.strip("/").split("/")[0]
        operation = _operation(
            builder,
            route,
            public=route.grpc_path in public,
            limited=route.grpc_path in limited,
            built=section_of[service] in built,
        )
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    paths.update(_edge_paths())

    tags = []
    for service in services:
        tags.append({"name": service.section, "description": builder.comments.get(service.full_name, "")})
    components = builder.components()
    components["Error"] = {
        "type": "object",
        "description": "Every error: a google.rpc.Status, its code the gRPC status code.",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"type": "integer", "minimum": 1, "maximum": 16, "description": "The gRPC status code."},
            "message": {"type": "string", "description": "What went wrong, naming the field when one is."},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pyth-On",
            "version": version,
            "summary": "Run code in a sandbox, with your secrets, packages and an audit log.",
            "description": (
                "Every error is `{code, message, details}` (the `Error` schema). JSON field names are "
                "lowerCamelCase; primitive fields are always present in answers; timestamps are RFC 3339. "
                "Every answer carries `x-request-id` (the client's, or a generated one)."
            ),
        },
        "tags": tags,
        "security": _SECURITY,
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "The API key from POST /api/register or /api/login.",
                },
                "BearerJwt": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "The access token (`token`) from POST /api/login or /api/refresh.",
                },
            },
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 0},
                },
                "WWW-Authenticate": {
                    "description": "The accepted credentials.",
                    "schema": {"type": "string"},
                },
            },
        },
    }


def render_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, indent=1, sort_keys=False, ensure_ascii=False) + "\n"


# The reference page -------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 2rem;color:#1d1d1f}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;margin-top:2.5rem}
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.5rem 1rem}
.op h3{margin:.3rem 0;font:600 1rem ui-monospace,monospace}
.verb{display:inline-block;min-width:4.5rem;color:#fff;border-radius:4px;padding:0 .4rem;margin-right:.5rem;text-align:center}
.get{background:#2b6cb0}.post{background:#2f855a}.put{background:#b7791f}.delete{background:#c53030}
table{border-collapse:collapse;margin:.3rem 0 .8rem}td,th{border:1px solid #e2e2e2;padding:.2rem .5rem;text-align:left;vertical-align:top}
code{font:.9em ui-monospace,monospace;background:#f4f4f4;padding:0 .2rem}pre{background:#f4f4f4;padding:.5rem;overflow-x:auto}.auth{color:#555;font-size:.9em}
nav a{margin-right:.8rem}
"""


def _type_text(schema: Mapping[str, Any]) -> str:
    """A short type name of a schema, with links to components."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[1]
        return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type_text(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map of {_type_text(schema['additionalProperties'])}"
    if "enum" in schema:
        return " | ".join(f"<code>{html.escape(json.dumps(value))}</code>" for value in schema["enum"])
    if isinstance(kind, list):
        text = " or ".join(kind)
    else:
        text = str(kind or "any JSON value")
    detail = schema.get("format") or schema.get("contentEncoding")
    return html.escape(f"{text} ({detail})" if detail else text)


def _prose(text: str) -> str:
    """Escaped text, with `code` spans of the document's Markdown as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _fields_table(schema: Mapping[str, Any]) -> str:
    properties = schema.get("properties", {})
    if not properties:
        return "<p>No fields.</p>" if "$ref" not in schema else f"<p>{_type_text(schema)}</p>"
    rows = "".join(
        f"<tr><td><code>{html.escape(name)}</code></td><td>{_type_text(field)}</td>"
        f"<td>{html.escape(field.get('description', ''))}</td></tr>"
        for name, field in properties.items()
    )
    return f"<table><tr><th>field</th><th>type</th><th>description</th></tr>{rows}</table>"


def reference_page(spec: Mapping[str, Any]) -> str:
    """The document as one self-contained HTML page (no script, no outside resource)."""
    info = spec["info"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(info['title'])} API reference</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(info['title'])} API reference</h1>",
        f"<p>Version {html.escape(info['version'])}. {html.escape(info['summary'])}</p>",
        f"<p>{_prose(info['description'])}</p>",
        f'<p>Machine-readable: <a href="{DOCUMENT_PATH}">{DOCUMENT_PATH}</a> (OpenAPI {spec["openapi"]}).</p>',
        "<p>Authentication: an API key in the <code>x-api-key</code> header, or "
        "<code>Authorization: Bearer &lt;token&gt;</code>. Calls marked <em>public</em> need neither.</p>",
    ]
    by_tag: dict[str, list[tuple[str, str, Mapping[str, Any]]]] = {}
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            by_tag.setdefault(operation["tags"][0], []).append((path, method, operation))
    parts.append(
        "<nav>"
        + "".join(f'<a href="#tag-{html.escape(tag)}">{html.escape(tag)}</a>' for tag in by_tag)
        + "</nav>"
    )
    descriptions = {tag["name"]: tag.get("description", "") for tag in spec.get("tags", [])}
    for tag, operations in by_tag.items():
        parts.append(f'<h2 id="tag-{html.escape(tag)}">{html.escape(tag)}</h2>')
        if descriptions.get(tag):
            parts.append(f"<p>{html.escape(descriptions[tag])}</p>")
        for path, method, operation in operations:
            anchor = html.escape(operation["operationId"])
            auth = "public" if operation.get("security") == [] else "API key or Bearer token"
            parts.append(f'<section class="op" id="{anchor}">')
            parts.append(
                f'<h3><span class="verb {method}">{method.upper()}</span>{html.escape(path)}</h3>'
                f"<p><strong>{html.escape(operation['summary'])}</strong> "
                f'<span class="auth">({auth})</span></p>'
            )
            description = operation.get("description", "").replace(operation["summary"], "", 1).strip(" .\n")
            if description:
                parts.append(f"<p>{_prose(description)}</p>")
            if operation.get("parameters"):
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
                    f"<td>{_type_text(p['schema'])}</td><td>{html.escape(p['schema'].get('description', ''))}</td></tr>"
                    for p in operation["parameters"]
                )
                parts.append(
                    "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th>"
                    f"<th>description</th></tr>{rows}</table>"
                )
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                if "$ref" in body:
                    name = str(body["$ref"]).rsplit("/", 1)[1]
                    body = {**spec["components"]["schemas"][name], "title": name}
                title = (
                    f" {_type_text({'$ref': '#/components/schemas/' + body['title']})}"
                    if "title" in body
                    else ""
                )
                parts.append(f"<h4>Request body (JSON){title}</h4>" + _fields_table(body))
                example = operation["requestBody"]["content"]["application/json"].get("example")
                if example is not None:
                    parts.append(
                        f"<p>Example:</p><pre><code>{html.escape(json.dumps(example, indent=2))}</code></pre>"
                    )
            rows = ""
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                kinds = ", ".join(
                    f"{html.escape(media)}: {_type_text(item.get('schema', {}))}"
                    for media, item in content.items()
                )
                rows += f"<tr><td>{status}</td><td>{html.escape(response['description'])}</td><td>{kinds}</td></tr>"
            parts.append(
                f"<h4>Responses</h4><table><tr><th>status</th><th>meaning</th><th>body</th></tr>{rows}</table>"
            )
            parts.append("</section>")
    parts.append('<h2 id="schemas">Schemas</h2>')
    for name, schema in spec["components"]["schemas"].items():
        parts.append(f'<section id="schema-{html.escape(name)}"><h3>{html.escape(name)}</h3>')
        if schema.get("description"):
            parts.append(f"<p>{html.escape(schema['description'])}</p>")
        parts.append(_fields_table(schema) + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
