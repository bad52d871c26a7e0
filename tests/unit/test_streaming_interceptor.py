"""The request interceptor on a server-streaming call (ExecutorService.ExecuteStream, in-process on
port 0): the identity verified before the servicer, the responses in order, a refusal before the
first message trailers-only with its code (and Retry-After with the status), and a caller that
hangs up closes the servicer's stream at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.platform.bootstrap import ServiceParts, Servicer, start_server
from services.platform.errors import ResourceExhausted
from services.platform.identity import Identity, require_identity
from services.platform.settings import ephemeral_server_settings
from tests.identity_keys import Keys, make_keys

ALICE = Identity("alice-id", "alice@example.com")


class Probe(executor_pb2_grpc.ExecutorServiceServicer):
    """ExecuteStream does what the request's code names."""

    def __init__(self) -> None:
        self.reached = False
        self.closed = asyncio.Event()

    async def ExecuteStream(self, request, context):  # noqa: N802 (gRPC method name)
        self.reached = True
        try:
            if request.code == "busy":
                raise ResourceExhausted("slow down", retry_after=7)
            yield executor_pb2.ExecuteEvent(stdout=require_identity().user_id)
            if request.code == "hang":
                await asyncio.sleep(3600)
            yield executor_pb2.ExecuteEvent(result=executor_pb2.ExecuteResponse(output="done"))
        finally:
            self.closed.set()


def call(keys: Keys, scenario) -> tuple[object, Probe]:
    probe = Probe()

    async def main() -> object:
        parts = ServiceParts(
            servicers=[
                Servicer(
                    executor_pb2_grpc.add_ExecutorServiceServicer_to_server,
                    probe,
                    "pythonon.executor.v1.ExecutorService",
                )
            ]
        )
        server, _health, port = await start_server(
            ephemeral_server_settings("executor", keys.public_key_file), parts
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(executor_pb2_grpc.ExecutorServiceStub(channel), probe)
        finally:
            await server.stop(None)

    return asyncio.run(main()), probe


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def test_the_stream_sees_the_verified_user_and_answers_in_order(keys: Keys) -> None:
    async def scenario(stub, probe):
        return [
            event
            async for event in stub.ExecuteStream(
                executor_pb2.ExecuteRequest(), metadata=keys.metadata(ALICE)
            )
        ]

    events, _ = call(keys, scenario)
    assert [event.WhichOneof("event") for event in events] == ["stdout", "result"]
    assert (events[0].stdout, events[1].result.output) == ("alice-id", "done")


def test_no_valid_assertion_never_reaches_the_stream(keys: Keys) -> None:
    async def scenario(stub, probe):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.ExecuteStream(executor_pb2.ExecuteRequest()):
                pass
        return refused.value

    refused, probe = call(keys, scenario)
    assert (refused.code(), refused.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid identity",
    )
    assert not probe.reached


def test_a_refusal_before_the_first_message_is_the_status_with_retry_after(keys: Keys) -> None:
    async def scenario(stub, probe):
        call = stub.ExecuteStream(executor_pb2.ExecuteRequest(code="busy"), metadata=keys.metadata(ALICE))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        return refused.value

    refused, _ = call(keys, scenario)
    assert (refused.code(), refused.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
    # Trailers-only: no headers before the status (Envoy would otherwise answer REST clients 200).
    assert ("retry-after", "7") in tuple(refused.trailing_metadata())
    assert "retry-after" not in dict(refused.initial_metadata())


def test_a_caller_that_hangs_up_closes_the_stream_at_once(keys: Keys) -> None:
    async def scenario(stub, probe):
        call = stub.ExecuteStream(executor_pb2.ExecuteRequest(code="hang"), metadata=keys.metadata(ALICE))
        first = await call.read()
        call.cancel()
        await asyncio.wait_for(probe.closed.wait(), 5)
        return first

    first, probe = call(keys, scenario)
    assert first.stdout == "alice-id" and probe.closed.is_set()
