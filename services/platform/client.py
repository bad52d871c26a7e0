"""The one way a service calls another: `connect("<service>")`, the client-side twin of
bootstrap.py.

The channel it returns does, on every call, what every internal call needs:

- a default deadline when the caller gave none, so no call waits forever on a hung service;
- the identity assertion, request id and client address of the request in hand (see
  identity.request_scope), unless the caller set them, so the callee acts for the same user and
  its logs and audit entries name the same request;
- a trace span whose context travels with the call (when tracing is on), so a trace runs on
  from the edge's request through every service it reaches;
- gRPC errors mapped to the domain errors of errors.py here and nowhere else: a caller catches
  `Unavailable`, `InvalidArgument`, ... (to reword them if it wants), never `grpc.RpcError`;
- mutual TLS: the caller presents its mesh certificate (PYTHONON_MESH_*, read by every service's
  settings at start-up) and accepts only a server certificate signed by the mesh CA that names the
  service it meant to call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.platform import service_graph, telemetry
from services.platform.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.platform.identity import request_scope
from services.platform.settings import Environment, MeshTls, service_address

DEFAULT_TIMEOUT_SECONDS = 5.0

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # A restarted service is reached on the next call, not after grpc's default back-off (up to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# Codes whose message is a callee's domain error: written to be shown to a user, passed on as it is.
_PASSED_ON: dict[grpc.StatusCode, type[DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def connect(
    service: str, address: str | None = None, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
) -> grpc.aio.Channel:
    """A channel to `service` (a name of the service graph) for its generated stubs.

    `address` ("host:port") is normally the one the service's settings read at start-up (with
    settings.service_address); without it, it is read now from the variable the graph names
    (PYTHONON_<SERVICE>_ADDRESS; SettingsError naming it when missing or malformed).
    `timeout_seconds` is the deadline of a call whose caller gives none."""
    service_graph.service(service)  # an unknown name is a programming error: ValueError
    if address is None:
        address = service_address(Environment(), service)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        # First, so that the tracing interceptors see the completed call and record the error
        # before it is mapped.
        _UnaryCall(service, timeout_seconds),
        _StreamingResponseCall(service, timeout_seconds),
        *telemetry.client_interceptors(),
    ]
    return _open_channel(service, address, interceptors, MeshTls.load_if_given(Environment()))


def channel_credentials(tls: MeshTls) -> grpc.ChannelCredentials:
    """How internal calls are secured, the one place to choose it: mutual TLS, trusting only the
    mesh CA. (Also what the runner's health checks and the tests' mesh clients use.)"""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.certificate_pem
    )


def tls_channel_options(service: str) -> tuple[tuple[str, str], ...]:
    """The name the server's certificate must carry: the service's, whatever the address (an IP on
    one machine, a Kubernetes Service's DNS name), so a call reaches the service it meant to."""
    return (("grpc.ssl_target_name_override", service),)


def channel_target(address: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """grpc's target for "host:port", or for several (a service's replicas, see
    service_graph.split_addresses) a static list balanced round-robin, call by call."""
    replicas = service_graph.split_addresses(address)
    if len(replicas) == 1:
        return address, ()
    scheme = "ipv6" if service_graph.ip_family(replicas[0][0]) == 6 else "ipv4"
    hosts = ",".join(f"[{host}]:{port}" if scheme == "ipv6" else f"{host}:{port}" for host, port in replicas)
    return f"{scheme}:{hosts}", (("grpc.lb_policy_name", "round_robin"),)


def _open_channel(
    service: str, address: str, interceptors: list[grpc.aio.ClientInterceptor], tls: MeshTls | None
) -> grpc.aio.Channel:
    target, balancing = channel_target(address)
    if tls is None:  # outside any mesh: against an in-process test server only (no service runs without)
        return grpc.aio.insecure_channel(
            target, options=(*CHANNEL_OPTIONS, *balancing), interceptors=interceptors
        )
    return grpc.aio.secure_channel(
        target,
        channel_credentials(tls),
        options=(*CHANNEL_OPTIONS, *balancing, *tls_channel_options(service)),
        interceptors=interceptors,
    )


def domain_error(service: str, error: grpc.aio.AioRpcError) -> DomainError:
    """The domain error for a failed call to `service`. Messages of the callee's domain errors pass
    on; anything else gets a fixed message (grpc's own text names addresses and internals)."""
    code = error.code()
    mapped: DomainError
    if code in _UNREACHABLE:
        mapped = Unavailable(f"the {service} service is unavailable; retry later")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        mapped = ResourceExhausted(error.details() or "too many requests", _retry_after(error))
    elif code in _PASSED_ON:
        mapped = _PASSED_ON[code](error.details() or code.name.lower())
    else:
        mapped = Internal("internal error")
    mapped.upstream_code = code
    return mapped


def _retry_after(error: grpc.aio.AioRpcError) -> int:
    for key, value in (*(error.initial_metadata() or ()), *(error.trailing_metadata() or ())):
        if key == "retry-after" and str(value).isdigit():
            return int(value)
    return 1


class _MeshCall:
    """Deadline, forwarded request facts and error mapping (see the module docstring)."""

    def __init__(self, service: str, timeout_seconds: float) -> None:
        self._service = service
        self._timeout = timeout_seconds

    def _complete(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        scope = request_scope()
        for key, value in (
            (service_graph.IDENTITY_HEADER, scope.assertion),
            (service_graph.REQUEST_ID_HEADER, scope.request_id),
            (service_graph.CLIENT_IP_HEADER, scope.client_ip),
        ):
            if value and key not in metadata:
                metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=self._timeout if details.timeout is None else details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


# grpc.aio files an interceptor under the first call kind it implements, so one class per kind.
class _UnaryCall(_MeshCall, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            call = await continuation(self._complete(client_call_details), request)
            return await call
        except grpc.aio.AioRpcError as error:
            raise domain_error(self._service, error) from error


class _StreamingResponseCall(_MeshCall, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> AsyncIterator[Any]:
        try:
            call = await continuation(self._complete(client_call_details), request)
        except grpc.aio.AioRpcError as error:
            raise domain_error(self._service, error) from error
        return self._mapped(call)

    async def _mapped(self, call: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise domain_error(self._service, error) from error
