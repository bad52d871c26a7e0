"""The one way every service starts: settings validated first, then a grpc.aio server with the
request interceptor, tracing, gRPC health and reflection, mutual TLS with the mesh's certificates,
and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.platform import service_graph, telemetry
from services.platform.access import AccessPolicy
from services.platform.audit import wait_for_units_of_work
from services.platform.identity import IdentityVerifier
from services.platform.interceptors import RequestInterceptor
from services.platform.settings import MeshTls, ServerSettings, SettingsError
from services.platform.structured_logs import configure_logging

S = TypeVar("S")
log = logging.getLogger("pythonon.bootstrap")

# What a service sends (and, through connect(), receives) at most; what it receives from a caller
# is service_graph.MAX_DECODED_REQUEST_BYTES.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Servicer:
    """A servicer and the generated function that adds it to a server."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    instance: Any
    service_name: str


@dataclass
class ServiceParts:
    """What a service's `build` returns: its servicers and what to close on shutdown."""

    servicers: Sequence[Servicer]
    generic_handlers: Sequence[grpc.GenericRpcHandler] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Names of servicers that cannot serve for want of configuration (e.g. the generator without an
    # API key): their gRPC health is NOT_SERVING while the server's own ("") is SERVING, so probes
    # keep the process in service and /health reports the service "not_configured".
    not_serving: Sequence[str] = ()


@dataclass(frozen=True)
class ServiceDefinition(Generic[S]):
    """A service: its name, how to read its settings, how to build its parts."""

    name: str
    load_settings: Callable[[], tuple[ServerSettings, S]]
    build: Callable[[ServerSettings, S], Awaitable[ServiceParts]]


async def start_server(
    server_settings: ServerSettings, parts: ServiceParts
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start a server for `parts` (also used by tests, on port 0); returns it, its health, its port."""
    interceptors = [
        *telemetry.server_interceptors(server_settings.service, server_settings.otlp_endpoint),
        RequestInterceptor(
            IdentityVerifier.from_file(server_settings.identity_public_key_file), AccessPolicy()
        ),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", service_graph.MAX_DECODED_REQUEST_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    for servicer in parts.servicers:
        servicer.add_to_server(servicer.instance, server)
    if parts.generic_handlers:
        server.add_generic_rpc_handlers(tuple(parts.generic_handlers))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.service_name for s in parts.servicers]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{server_settings.host}:{server_settings.port}"
    tls = server_settings.mesh_tls
    if tls is None:  # an in-process test server (ephemeral_server_settings); a mesh's always has TLS
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials(tls))
    if port == 0:
        raise OSError(f"cannot listen on {server_settings.host}:{server_settings.port}")
    await server.start()
    for name in ["", *names]:
        serving = name not in parts.not_serving
        await health_servicer.set(
            name,
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING,
        )
    return server, health_servicer, port


def server_credentials(tls: MeshTls) -> grpc.ServerCredentials:
    """Mutual TLS: the server presents its mesh certificate and refuses, in the handshake, every
    client without a certificate signed by the mesh CA: no call of an outside process reaches a
    servicer (or an interceptor) at all."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.certificate_pem)], root_certificates=tls.ca_pem, require_client_auth=True
    )


async def start_health_server(
    host: str, port: int, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server answering only grpc.health.v1 from the service's own health servicer, for
    probes without a mesh certificate (the kubelet's gRPC probes speak no TLS). It tells whether
    the service is serving, nothing else; returns it and its port."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (health)")
    await server.start()
    return server, bound


async def _serve(definition: ServiceDefinition[S], server_settings: ServerSettings, settings: S) -> None:
    # Before build: the clients it connects are traced by the same provider as the server.
    telemetry.configure(server_settings.service, server_settings.otlp_endpoint)
    parts = await definition.build(server_settings, settings)
    server, health_servicer, port = await start_server(server_settings, parts)
    log.info("serving", extra={"host": server_settings.host, "port": port})
    health_server = None
    if server_settings.health_port is not None:
        health_server, _ = await start_health_server(
            server_settings.host, server_settings.health_port, health_servicer
        )

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()

    log.info("stopping", extra={"grace_seconds": server_settings.shutdown_grace_seconds})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(server_settings.shutdown_grace_seconds)
    if health_server is not None:  # answered NOT_SERVING through the grace period
        await health_server.stop(None)
    # Changes whose requests were cancelled still owe their audit record: finish them first.
    await wait_for_units_of_work(server_settings.shutdown_grace_seconds)
    for close in parts.on_stop:
        await close()
    if server_settings.otlp_endpoint:
        telemetry.shutdown()
    log.info("stopped")


def run(definition: ServiceDefinition[S]) -> None:
    """Entry point of a service process: exits 2 with a clear message when settings are wrong."""
    try:
        server_settings, settings = definition.load_settings()
    except SettingsError as error:
        print(f"pythonon-{definition.name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(definition.name, server_settings.log_level)
    try:
        asyncio.run(_serve(definition, server_settings, settings))
    except SettingsError as error:  # found while building, e.g. a database schema not at head
        print(f"pythonon-{definition.name}: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
