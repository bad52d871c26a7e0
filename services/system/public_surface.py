"""Server reflection and grpc.health.v1 for native gRPC clients at the edge, for the public API only.

The edge routes `/grpc.reflection.v1.ServerReflection/`, `/grpc.reflection.v1alpha.ServerReflection/`
and `/grpc.health.v1.Health/` to this service under the prefixed names of the service graph
(`PUBLIC_GRPC_PREFIX`), where these handlers answer. So `grpcurl` (or any reflection client)
pointed at the edge lists and describes the public services and nothing else: the internal
services (the audit recorder, the secrets and packages resolvers, the executor's capabilities,
encrypted runs and sandbox runner, Envoy's ext_authz) are neither listed nor found by name, and
the messages only they use are left out of the files served. A public service is one with a REST
mapping, the rule the edge routes by (edge/config.py `services`).

Health answers for the whole API ("": SERVING unless /health is degraded) and for each public
service (SERVING when its section is "ok"), from the same checks as GET /health; another name is
NOT_FOUND. The system service's own reflection and health, under the plain names, are untouched:
the runner, the probes and the mesh use them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

import grpc
from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from services.platform import access  # noqa: F401 (loads every section's descriptors)
from services.platform.service_graph import PUBLIC_GRPC_PREFIX, PUBLIC_GRPC_SERVICES, SECTIONS
from services.system.health import OK, HealthChecker

log = logging.getLogger("pythonon.system.public")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# How often Watch re-checks (each check asks every service and dependency).
WATCH_INTERVAL_SECONDS = 5.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def public_services(pool: descriptor_pool.DescriptorPool | None = None) -> list[descriptor.ServiceDescriptor]:
    """The services of the API sections with a REST mapping, in section order."""
    pool = pool or descriptor_pool.Default()
    found = []
    for section in SECTIONS:
        file = pool.FindFileByName(f"pythonon/{section}/v1/{section}.proto")
        for service in file.services_by_name.values():
            if any(method.GetOptions().HasExtension(annotations_pb2.http) for method in service.methods):
                found.append(service)
    return found


def _reachable_messages(services: Iterable[descriptor.ServiceDescriptor]) -> set[str]:
    """Full names of every message the methods of `services` take or answer, transitively."""
    seen: set[str] = set()
    pending = [m.input_type for s in services for m in s.methods] + [
        m.output_type for s in services for m in s.methods
    ]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        pending.extend(field.message_type for field in message.fields if field.message_type is not None)
        pending.extend(message.nested_types)
    return seen


def public_pool(services: list[descriptor.ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool of the files of `services` and their imports, with the internal services and the
    messages only they use removed; the health proto too, so that it can be described."""
    public = {service.full_name for service in services}
    reachable = _reachable_messages(services)
    ordered: list[descriptor.FileDescriptor] = []

    def add(file: descriptor.FileDescriptor) -> None:
        if file in ordered:
            return
        for dependency in file.dependencies:
            add(dependency)
        ordered.append(file)

    for service in services:
        add(service.file)
    add(health_pb2.DESCRIPTOR)
    pool = descriptor_pool.DescriptorPool()
    for file in ordered:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if proto.package.startswith("pythonon."):
            kept_services = [s for s in proto.service if f"{proto.package}.{s.name}" in public]
            kept_messages = [m for m in proto.message_type if f"{proto.package}.{m.name}" in reachable]
            del proto.service[:]
            proto.service.extend(kept_services)
            del proto.message_type[:]
            proto.message_type.extend(kept_messages)
        pool.Add(proto)
    return pool


class PublicHealth:
    """grpc.health.v1 for the public API, from the system service's health checks."""

    def __init__(self, health: HealthChecker, services: Iterable[str]) -> None:
        self._health = health
        self._sections = {name: name.split(".")[1] for name in services}

    def _known(self, name: str) -> bool:
        return name == "" or name in self._sections

    async def status(self, name: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        report = await self._health.check()
        if name == "":
            return _NOT_SERVING if report.degraded else _SERVING
        return _SERVING if report.services.get(self._sections[name]) == OK else _NOT_SERVING

    async def Check(  # noqa: N802 (gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if not self._known(request.service):
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=await self.status(request.service))

    async def Watch(  # noqa: N802 (gRPC method name)
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        # The protocol: an unknown service is SERVICE_UNKNOWN (it may appear later), not an error.
        last = None
        while True:
            status = await self.status(request.service) if self._known(request.service) else _UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)


def handlers(health: HealthChecker) -> list[grpc.GenericRpcHandler]:
    """The prefixed reflection (v1 and v1alpha: the same messages on the wire) and health services."""
    services = public_services()
    names = [service.full_name for service in services]
    reflection = ReflectionServicer([*names, HEALTH_SERVICE], pool=public_pool(services))
    reflection_method = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            reflection.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    public_health = PublicHealth(health, names)
    health_methods = {
        "Check": grpc.unary_unary_rpc_method_handler(
            public_health.Check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            public_health.Watch,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    return [
        grpc.method_handlers_generic_handler(
            f"{PUBLIC_GRPC_PREFIX}{name}", health_methods if name == HEALTH_SERVICE else reflection_method
        )
        for name in PUBLIC_GRPC_SERVICES
    ]
