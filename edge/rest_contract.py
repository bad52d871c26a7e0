"""What each REST call accepts, read from the descriptor set, for the edge's request checks.

The transcoder drops JSON fields it does not know, and its own complaints about a wrong type name
protobuf types (``for type TYPE_DOUBLE``, ``type.googleapis.com/google.protobuf.Timestamp``) or,
for some shapes, get through as a corrupt message that the service refuses with a 500. So the
edge's Lua filter checks every REST request before the transcoder sees it, against the tables
rendered here: which methods each path template takes (a wrong method is a 405 with ``Allow``),
where the request message comes from (path, query, body), and every field of every message a
request can hold, with the JSON form it expects. The Lua source that uses them is
``rest_checks.lua`` next to this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2

_FieldProto = descriptor_pb2.FieldDescriptorProto

LUA_SOURCE: Path = Path(__file__).resolve().parent / "rest_checks.lua"

# Protobuf types whose JSON form is not an object of their fields (the proto3 JSON mapping).
_WELL_KNOWN = {
    "google.protobuf.Timestamp": "timestamp",
    "google.protobuf.Duration": "duration",
    "google.protobuf.Struct": "struct",
    "google.protobuf.Value": "value",
    "google.protobuf.ListValue": "list",
    "google.protobuf.FieldMask": "fieldmask",
    "google.protobuf.Empty": "empty",
    "google.protobuf.Any": "any",
    "google.protobuf.DoubleValue": "double",
    "google.protobuf.FloatValue": "float",
    "google.protobuf.Int64Value": "int64",
    "google.protobuf.UInt64Value": "uint64",
    "google.protobuf.Int32Value": "int32",
    "google.protobuf.UInt32Value": "uint32",
    "google.protobuf.BoolValue": "bool",
    "google.protobuf.StringValue": "string",
    "google.protobuf.BytesValue": "bytes",
}

_SCALARS = {
    _FieldProto.TYPE_STRING: "string",
    _FieldProto.TYPE_BYTES: "bytes",
    _FieldProto.TYPE_BOOL: "bool",
    _FieldProto.TYPE_DOUBLE: "double",
    _FieldProto.TYPE_FLOAT: "float",
    _FieldProto.TYPE_INT32: "int32",
    _FieldProto.TYPE_SINT32: "int32",
    _FieldProto.TYPE_SFIXED32: "int32",
    _FieldProto.TYPE_UINT32: "uint32",
    _FieldProto.TYPE_FIXED32: "uint32",
    _FieldProto.TYPE_INT64: "int64",
    _FieldProto.TYPE_SINT64: "int64",
    _FieldProto.TYPE_SFIXED64: "int64",
    _FieldProto.TYPE_UINT64: "uint64",
    _FieldProto.TYPE_FIXED64: "uint64",
}

_METHODS = ("get", "put", "post", "delete", "patch")
# A template variable: {name} or {name=*} (one segment), {name=**} (the rest of the path).
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=(\*\*?))?\}")
_LITERAL = re.compile(r"[A-Za-z0-9_.~\-/]*")


@dataclass(frozen=True)
class RestRoute:
    """One REST binding of a gRPC method (``google.api.http``)."""

    method: str  # "PUT"
    template: str  # "/api/v1/secrets/{name}"
    pattern: str  # Lua pattern of the path, one capture per variable
    variables: tuple[str, ...]  # field paths bound by the path: ("name",)
    body: str  # "" (no body), "*" (the whole message) or the field the body fills
    input_type: str  # "pythonon.secrets.v1.PutSecretRequest"
    grpc_path: str  # "/pythonon.secrets.v1.SecretsService/PutSecret"
    output_type: str  # "pythonon.secrets.v1.SecretMetadata"
    server_streaming: bool  # the answer is a stream of output messages (NDJSON on REST)


@dataclass
class MessageSchema:
    """The fields of one message, each as the Lua checker reads it."""

    fields: list[dict[str, object]] = field(default_factory=list)


def _lua_pattern(template: str) -> tuple[str, tuple[str, ...]]:
    """The Lua pattern matching a path template, and the field paths it binds, in order."""
    pattern, variables, position = "^", [], 0
    for match in _VARIABLE.finditer(template):
        literal = template[position : match.start()]
        if not _LITERAL.fullmatch(literal):
            raise ValueError(f"path template {template!r}: unsupported characters in {literal!r}")
        pattern += re.sub(r"([^A-Za-z0-9/])", r"%\1", literal)
        pattern += "(.+)" if match.group(2) == "**" else "([^/]+)"
        variables.append(match.group(1))
        position = match.end()
    literal = template[position:]
    if not _LITERAL.fullmatch(literal) or "{" in literal or ":" in literal:
        raise ValueError(
            f"path template {template!r}: only {{field}}, {{field=*}} and {{field=**}} are supported"
        )
    return pattern + re.sub(r"([^A-Za-z0-9/])", r"%\1", literal) + "$", tuple(variables)


def _bindings(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def routes(files: Iterable[descriptor_pb2.FileDescriptorProto], services: Iterable[str]) -> list[RestRoute]:
    """Every REST binding of the methods of ``services`` (full names), in descriptor order."""
    wanted = set(services)
    found = []
    for file in files:
        for service in file.service:
            if f"{file.package}.{service.name}" not in wanted:
                continue
            for method in service.method:
                if not method.options.HasExtension(annotations_pb2.http):
                    continue
                for rule in _bindings(method.options.Extensions[annotations_pb2.http]):
                    verb = rule.WhichOneof("pattern")
                    if verb not in _METHODS:
                        raise ValueError(f"{service.name}.{method.name}: unsupported HTTP rule {verb!r}")
                    template = getattr(rule, verb)
                    pattern, variables = _lua_pattern(template)
                    found.append(
                        RestRoute(
                            method=verb.upper(),
                            template=template,
                            pattern=pattern,
                            variables=variables,
                            body=rule.body,
                            input_type=method.input_type.lstrip("."),
                            grpc_path=f"/{file.package}.{service.name}/{method.name}",
                            output_type=method.output_type.lstrip("."),
                            server_streaming=method.server_streaming,
                        )
                    )
    return found


def allowed_methods(found: Iterable[RestRoute]) -> dict[str, list[str]]:
    """The methods each path template takes (what a 405 lists in ``Allow``)."""
    methods: dict[str, list[str]] = {}
    for route in found:
        listed = methods.setdefault(route.template, [])
        if route.method not in listed:
            listed.append(route.method)
    return methods


def _messages_by_name(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> dict[str, descriptor_pb2.DescriptorProto]:
    by_name: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}" if prefix else message.name
        by_name[name] = message
        for nested in message.nested_type:
            add(name, nested)

    for file in files:
        for message in file.message_type:
            add(file.package, message)
    return by_name


def _enums_by_name(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}

    def add_message(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        for enum in message.enum_type:
            by_name[f"{name}.{enum.name}"] = [value.name for value in enum.value]
        for nested in message.nested_type:
            add_message(name, nested)

    for file in files:
        for enum in file.enum_type:
            by_name[f"{file.package}.{enum.name}".lstrip(".")] = [value.name for value in enum.value]
        for message in file.message_type:
            add_message(file.package, message)
    return by_name


def schemas(
    files: Iterable[descriptor_pb2.FileDescriptorProto], roots: Iterable[str]
) -> dict[str, MessageSchema]:
    """The schema of every message reachable from the ``roots`` (full names), by full name."""
    files = list(files)
    messages = _messages_by_name(files)
    enums = _enums_by_name(files)
    found: dict[str, MessageSchema] = {}

    def value_spec(proto: _FieldProto) -> dict[str, object]:
        type_name = proto.type_name.lstrip(".")
        if proto.type in _SCALARS:
            return {"kind": _SCALARS[proto.type]}
        if proto.type == _FieldProto.TYPE_ENUM:
            return {"kind": "enum", "values": enums[type_name]}
        if type_name in _WELL_KNOWN:
            return {"kind": _WELL_KNOWN[type_name]}
        visit(type_name)
        return {"kind": "message", "message": type_name}

    def visit(name: str) -> None:
        if name in found:
            return
        message = messages[name]
        schema = found[name] = MessageSchema()
        for proto in message.field:
            spec: dict[str, object] = {"json": proto.json_name or proto.name, "proto": proto.name}
            entry_name = proto.type_name.lstrip(".")
            entry = messages.get(entry_name) if proto.type == _FieldProto.TYPE_MESSAGE else None
            if entry is not None and entry.options.map_entry:
                key, value = entry.field
                spec.update(kind="map", key=_SCALARS[key.type], value=value_spec(value))
            else:
                spec.update(value_spec(proto))
                if proto.label == _FieldProto.LABEL_REPEATED:
                    spec["repeated"] = True
            if field_behavior_pb2.REQUIRED in proto.options.Extensions[field_behavior_pb2.field_behavior]:
                spec["required"] = True
            if proto.HasField("oneof_index") and not proto.proto3_optional:
                spec["oneof"] = message.oneof_decl[proto.oneof_index].name
            schema.fields.append(spec)

    for root in roots:
        visit(root)
    return found


def _lua(value: object) -> str:
    """A Lua literal of a JSON-like value (str, bool, int, list, dict with str keys)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = "".join(
            character
            if character.isascii() and character.isprintable() and character not in '"\\'
            else "".join(f"\\{byte}" for byte in character.encode("utf-8"))
            for character in value
        )
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "{" + ", ".join(_lua(item) for item in value) + "}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"[{_lua(key)}] = {_lua(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")


def lua_tables(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
    services: Iterable[str],
    constants: Mapping[str, object],
) -> str:
    """Lua statements defining ROUTES, MESSAGES and the given constants, for ``rest_checks.lua``."""
    files = list(files)
    found = routes(files, services)
    messages = schemas(files, sorted({route.input_type for route in found}))
    rows = [
        {
            "method": route.method,
            "template": route.template,
            "pattern": route.pattern,
            "variables": list(route.variables),
            "body": route.body,
            "input": route.input_type,
            "stream": route.server_streaming,
        }
        for route in found
    ]
    lines = [f"local ROUTES = {_lua(rows)}"]
    lines.append(
        "local MESSAGES = "
        + _lua({name: {"fields": schema.fields} for name, schema in sorted(messages.items())})
    )
    for name, value in constants.items():
        lines.append(f"local {name} = {_lua(value)}")
    return "\n".join(lines) + "\n"


def lua_source(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
    services: Iterable[str],
    constants: Mapping[str, object],
) -> str:
    """The edge's Lua filter: the generated tables, then ``rest_checks.lua``."""
    return lua_tables(files, services, constants) + LUA_SOURCE.read_text()
