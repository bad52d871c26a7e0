"""connect(): the one way a service calls another. Checked against real servers built by the
bootstrap on port 0 (with the request interceptor that verifies identity): the default deadline,
the request's identity, request id and client address forwarded, gRPC errors mapped to domain
errors, and a trace that runs from one server through the client into the next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc
from pythonon.zk.v1 import zk_pb2, zk_pb2_grpc

from services.platform import telemetry
from services.platform.bootstrap import ServiceParts, Servicer, start_server
from services.platform.client import DEFAULT_TIMEOUT_SECONDS, connect
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
from services.platform.identity import (
    Identity,
    RequestScope,
    current_request,
    request_scope,
    require_identity,
)
from services.platform.service_graph import CLIENT_IP_HEADER, IDENTITY_HEADER, REQUEST_ID_HEADER
from services.platform.settings import SettingsError, ephemeral_server_settings
from tests.identity_keys import Keys, make_keys

ALICE = Identity("alice-id", "alice@example.com")
BOB = Identity("bob-id", "bob@example.com")

# What the callee raises for a name in ResolveSecretsRequest.names.
FAILURES: dict[str, Exception] = {
    "not-found": NotFound("no secret named X"),
    "invalid": InvalidArgument("X is not a valid name"),
    "denied": PermissionDenied("not yours"),
    "exists": AlreadyExists("X exists"),
    "precondition": FailedPrecondition("not ready"),
    "exhausted": ResourceExhausted("slow down", retry_after=7),
    "crash": RuntimeError("postgresql://admin:hunter2@db is down"),
}


class Callee(secrets_pb2_grpc.SecretsResolverServiceServicer):
    """Answers with what it saw of the call, or fails as the request names."""

    async def ResolveSecrets(self, request, context):  # noqa: N802 (gRPC method name)
        if request.names and request.names[0] in FAILURES:
            raise FAILURES[request.names[0]]
        if request.names and request.names[0] == "sleep":
            await asyncio.sleep(5)
        scope = request_scope()
        return secrets_pb2.ResolveSecretsResponse(
            values={
                "user": require_identity().user_id,
                "request_id": scope.request_id,
                "client_ip": scope.client_ip,
                "time_remaining": f"{context.time_remaining():.3f}",
            }
        )


class Caller(zk_pb2_grpc.ZkServiceServicer):
    """A service that calls the callee for the request in hand (as the executor calls secrets)."""

    def __init__(self, callee_address: str) -> None:
        self._channel = connect("secrets", callee_address)

    async def Encrypt(self, request, context):  # noqa: N802 (gRPC method name)
        stub = secrets_pb2_grpc.SecretsResolverServiceStub(self._channel)
        seen = await stub.ResolveSecrets(secrets_pb2.ResolveSecretsRequest(all=True))
        return zk_pb2.ZKPayload(algorithm=f"{seen.values['user']} {seen.values['request_id']}")


@asynccontextmanager
async def serving(keys: Keys, name: str, servicer: Servicer) -> AsyncIterator[str]:
    server, _health, port = await start_server(
        ephemeral_server_settings(name, keys.public_key_file), ServiceParts(servicers=[servicer])
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def callee(keys: Keys) -> Any:
    return serving(
        keys,
        "secrets",
        Servicer(
            secrets_pb2_grpc.add_SecretsResolverServiceServicer_to_server,
            Callee(),
            "pythonon.secrets.v1.SecretsResolverService",
        ),
    )


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def in_scope(keys: Keys, user: Identity | None, request_id: str = "", client_ip: str = "") -> RequestScope:
    return RequestScope(
        identity=user,
        request_id=request_id,
        client_ip=client_ip,
        assertion=keys.signer.sign(user) if user else "",
    )


def resolve(
    keys: Keys,
    scope: RequestScope | None,
    *names: str,
    address: str | None = None,
    **call: Any,
) -> dict[str, str]:
    """ResolveSecrets through connect(), from inside `scope` (as a servicer would call it)."""

    async def main() -> dict[str, str]:
        async with callee(keys) as served:
            default = {"timeout_seconds": call.pop("default")} if "default" in call else {}
            channel = connect("secrets", address or served, **default)
            try:
                if scope is not None:
                    current_request.set(scope)
                stub = secrets_pb2_grpc.SecretsResolverServiceStub(channel)
                response = await stub.ResolveSecrets(secrets_pb2.ResolveSecretsRequest(names=names), **call)
                return dict(response.values)
            finally:
                await channel.close()

    return asyncio.run(main())


# -- what every call carries ----------------------------------------------------------------------


def test_the_request_in_hand_is_forwarded(keys: Keys) -> None:
    seen = resolve(keys, in_scope(keys, ALICE, request_id="req-42", client_ip="203.0.113.9"))
    assert (seen["user"], seen["request_id"], seen["client_ip"]) == ("alice-id", "req-42", "203.0.113.9")


def test_what_the_caller_sets_is_not_overridden(keys: Keys) -> None:
    scope = in_scope(keys, ALICE, request_id="req-42", client_ip="203.0.113.9")
    metadata = (
        (IDENTITY_HEADER, keys.signer.sign(BOB)),
        (REQUEST_ID_HEADER, "req-mine"),
        (CLIENT_IP_HEADER, "198.51.100.1"),
    )
    seen = resolve(keys, scope, metadata=metadata)
    assert (seen["user"], seen["request_id"], seen["client_ip"]) == ("bob-id", "req-mine", "198.51.100.1")


def test_no_request_in_hand_means_no_identity(keys: Keys) -> None:
    with pytest.raises(Unauthenticated) as refused:
        resolve(keys, None)
    assert refused.value.message == "missing or invalid identity"


def test_a_default_deadline_is_set_and_the_callers_own_wins(keys: Keys) -> None:
    scope = in_scope(keys, ALICE)
    # (gRPC rounds a deadline up to its timer's granularity: a few milliseconds.)
    assert 6.5 < float(resolve(keys, scope, default=7.0)["time_remaining"]) < 7.1
    assert 19.5 < float(resolve(keys, scope, default=7.0, timeout=20)["time_remaining"]) < 20.1
    assert (
        DEFAULT_TIMEOUT_SECONDS - 0.5
        < float(resolve(keys, scope)["time_remaining"])
        < DEFAULT_TIMEOUT_SECONDS + 0.1
    )


# -- errors become domain errors, here and nowhere else -----------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("not-found", NotFound, "no secret named X"),
        ("invalid", InvalidArgument, "X is not a valid name"),
        ("denied", PermissionDenied, "not yours"),
        ("exists", AlreadyExists, "X exists"),
        ("precondition", FailedPrecondition, "not ready"),
        ("exhausted", ResourceExhausted, "slow down"),
        # Nothing of an unexpected failure travels on: not the callee's text, not grpc's.
        ("crash", Internal, "internal error"),
    ],
)
def test_the_callees_errors_are_domain_errors(keys: Keys, name: str, kind: type, message: str) -> None:
    with pytest.raises(DomainError) as failed:
        resolve(keys, in_scope(keys, ALICE), name)
    assert type(failed.value) is kind
    assert failed.value.message == message
    assert isinstance(failed.value.__cause__, grpc.aio.AioRpcError)


def test_retry_after_travels_with_resource_exhausted(keys: Keys) -> None:
    with pytest.raises(ResourceExhausted) as failed:
        resolve(keys, in_scope(keys, ALICE), "exhausted")
    assert failed.value.retry_after == 7


def test_a_slow_callee_is_unavailable_after_the_deadline(keys: Keys) -> None:
    with pytest.raises(Unavailable) as failed:
        resolve(keys, in_scope(keys, ALICE), "sleep", default=0.3)
    assert failed.value.upstream_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.value.message == "the secrets service is unavailable; retry later"


def test_a_callee_that_is_down_is_unavailable_without_its_address(keys: Keys) -> None:
    with pytest.raises(Unavailable) as failed:
        resolve(keys, in_scope(keys, ALICE), address="127.0.0.1:1")
    assert failed.value.upstream_code == grpc.StatusCode.UNAVAILABLE
    assert failed.value.message == "the secrets service is unavailable; retry later"


def test_a_stream_that_fails_is_a_domain_error(keys: Keys) -> None:
    async def main() -> None:
        async with callee(keys) as served:
            async with connect("executor", served) as channel:
                stream = channel.unary_stream("/pythonon.executor.v1.ExecutorService/ExecuteStream")(b"")
                with pytest.raises(Internal) as failed:
                    async for _event in stream:
                        pass
                assert failed.value.upstream_code == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(main())


# -- where the address comes from -----------------------------------------------------------------


def test_the_address_is_read_from_the_variable_the_graph_names(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> str:
        async with callee(keys) as served:
            monkeypatch.setenv("PYTHONON_SECRETS_ADDRESS", served)
            current_request.set(in_scope(keys, ALICE))
            async with connect("secrets") as channel:
                stub = secrets_pb2_grpc.SecretsResolverServiceStub(channel)
                return (await stub.ResolveSecrets(secrets_pb2.ResolveSecretsRequest())).values["user"]

    assert asyncio.run(main()) == "alice-id"


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (None, "PYTHONON_SECRETS_ADDRESS is required but not set"),
        ("secrets", "PYTHONON_SECRETS_ADDRESS: expected host:port"),
        ("secrets:99999", "PYTHONON_SECRETS_ADDRESS: expected host:port with a port 1-65535"),
    ],
)
def test_a_missing_or_malformed_address_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, value: str | None, complaint: str
) -> None:
    if value is None:
        monkeypatch.delenv("PYTHONON_SECRETS_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("PYTHONON_SECRETS_ADDRESS", value)
    with pytest.raises(SettingsError) as refused:
        connect("secrets")
    assert complaint in str(refused.value)


def test_an_unknown_service_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown service 'billing'"):
        connect("billing", "127.0.0.1:1")


# -- one trace across services --------------------------------------------------------------------


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use(provider)
    yield exporter
    telemetry.use(None)
    provider.shutdown()


def run_through_caller(keys: Keys, scenario: Callable[[zk_pb2_grpc.ZkServiceStub], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with callee(keys) as inner:
            caller = Caller(inner)
            outer_servicer = Servicer(
                zk_pb2_grpc.add_ZkServiceServicer_to_server, caller, "pythonon.zk.v1.ZkService"
            )
            async with serving(keys, "zk", outer_servicer) as outer:
                try:
                    # The test is the edge: a plain channel, no tracing of its own.
                    async with grpc.aio.insecure_channel(outer) as channel:
                        return await scenario(zk_pb2_grpc.ZkServiceStub(channel))
                finally:
                    await caller._channel.close()

    return asyncio.run(main())


def test_a_service_calls_another_for_the_user_and_request_in_hand(keys: Keys) -> None:
    async def scenario(stub: zk_pb2_grpc.ZkServiceStub) -> str:
        metadata = (*keys.metadata(ALICE), (REQUEST_ID_HEADER, "req-7"))
        return (await stub.Encrypt(zk_pb2.EncryptRequest(), metadata=metadata, timeout=10)).algorithm

    assert run_through_caller(keys, scenario) == "alice-id req-7"


def test_one_trace_runs_from_server_through_client_to_server(keys: Keys, spans: InMemorySpanExporter) -> None:
    async def scenario(stub: zk_pb2_grpc.ZkServiceStub) -> None:
        await stub.Encrypt(zk_pb2.EncryptRequest(), metadata=keys.metadata(ALICE), timeout=10)

    run_through_caller(keys, scenario)
    finished = spans.get_finished_spans()
    by_kind = {(span.kind, span.name): span for span in finished}
    assert len(by_kind) == len(finished) == 3, [(s.kind, s.name) for s in finished]
    outer = by_kind[(SpanKind.SERVER, "/pythonon.zk.v1.ZkService/Encrypt")]
    client = by_kind[(SpanKind.CLIENT, "/pythonon.secrets.v1.SecretsResolverService/ResolveSecrets")]
    inner = by_kind[(SpanKind.SERVER, "/pythonon.secrets.v1.SecretsResolverService/ResolveSecrets")]
    assert outer.parent is None  # the edge sent no trace context
    assert client.parent is not None and client.parent.span_id == outer.context.span_id
    assert inner.parent is not None and inner.parent.span_id == client.context.span_id
    assert inner.parent.is_remote and not client.parent.is_remote
    assert len({outer.context.trace_id, client.context.trace_id, inner.context.trace_id}) == 1


def test_nothing_is_traced_when_tracing_is_off(keys: Keys) -> None:
    # The channel gets no tracing interceptor at all (an untraced service pays nothing).
    assert telemetry.client_interceptors() == []
    assert telemetry.server_interceptors("zk", None) == []
