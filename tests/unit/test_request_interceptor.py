"""The request interceptor every service runs: identity verified before the servicer, domain errors
mapped to their gRPC codes in one place, anything unexpected answered without its details."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from pythonon.zk.v1 import zk_pb2, zk_pb2_grpc

from services.platform.bootstrap import ServiceParts, Servicer, start_server
from services.platform.errors import NotFound, ResourceExhausted
from services.platform.identity import Identity, require_identity
from services.platform.settings import ephemeral_server_settings
from tests.identity_keys import Keys, make_keys

ALICE = Identity("alice-id", "alice@example.com")


class Probe(zk_pb2_grpc.ZkServiceServicer):
    """A servicer whose methods show what the interceptor does with each outcome."""

    async def Encrypt(self, request, context):  # noqa: N802 (gRPC method name)
        return zk_pb2.ZKPayload(algorithm=require_identity().user_id)

    async def ListCode(self, request, context):  # noqa: N802
        raise RuntimeError("connection string postgresql://admin:hunter2@db failed")

    async def DeleteCode(self, request, context):  # noqa: N802
        raise NotFound(f"no code named {request.name}")

    async def PutCode(self, request, context):  # noqa: N802
        raise ResourceExhausted("slow down", retry_after=7)


def call(keys: Keys, scenario) -> object:
    async def main() -> object:
        parts = ServiceParts(
            servicers=[
                Servicer(zk_pb2_grpc.add_ZkServiceServicer_to_server, Probe(), "pythonon.zk.v1.ZkService")
            ]
        )
        server, _health, port = await start_server(
            ephemeral_server_settings("zk", keys.public_key_file), parts
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = zk_pb2_grpc.ZkServiceStub(channel)
                stub.channel = channel  # for calls that bypass the stub's serializers
                return await scenario(stub)
        finally:
            await server.stop(None)

    return asyncio.run(main())


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


def test_the_servicer_sees_the_verified_user(keys: Keys) -> None:
    async def scenario(stub):
        return await stub.Encrypt(zk_pb2.EncryptRequest(), metadata=keys.metadata(ALICE))

    assert call(keys, scenario).algorithm == "alice-id"


@pytest.mark.parametrize("assertion", ["", "not-a-jwt", "forged"])
def test_no_valid_assertion_never_reaches_the_servicer(keys: Keys, tmp_path: Path, assertion: str) -> None:
    if assertion == "forged":
        other = tmp_path / "other"
        other.mkdir()
        assertion = make_keys(other).signer.sign(ALICE)

    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Encrypt(zk_pb2.EncryptRequest(), metadata=(("x-pythonon-identity", assertion),))
        return refused.value

    refused = call(keys, scenario)
    assert (refused.code(), refused.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid identity",
    )


def test_domain_errors_keep_their_code_and_message(keys: Keys) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DeleteCode(zk_pb2.DeleteCodeRequest(name="job"), metadata=keys.metadata(ALICE))
        return refused.value

    refused = call(keys, scenario)
    assert (refused.code(), refused.details()) == (grpc.StatusCode.NOT_FOUND, "no code named job")


def test_resource_exhausted_carries_retry_after(keys: Keys) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PutCode(zk_pb2.PutCodeRequest(), metadata=keys.metadata(ALICE))
        return refused.value

    refused = call(keys, scenario)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "7") in tuple(refused.initial_metadata())


def test_an_unexpected_error_is_internal_without_its_details(keys: Keys) -> None:
    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListCode(zk_pb2.ListCodeRequest(), metadata=keys.metadata(ALICE))
        return refused.value

    refused = call(keys, scenario)
    assert (refused.code(), refused.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    assert "hunter2" not in str(refused.debug_error_string())


@pytest.mark.parametrize(
    ("body", "case"),
    [(b"\xff\xff\xff\xff", "corrupt wire format"), (b"\x0a\x02\xc3\x28", "bad UTF-8 in a string field")],
)
def test_bytes_that_are_not_the_message_are_invalid_argument_without_internals(
    keys: Keys, caplog: pytest.LogCaptureFixture, body: bytes, case: str
) -> None:
    """A native gRPC client that sends bytes which do not parse as the method's request: gRPC on
    its own answers UNKNOWN with "Unexpected <class 'google.protobuf.message.DecodeError'>" and logs
    a traceback; the interceptor refuses it as the caller's mistake. An identity is still checked
    first: without one the answer says nothing about the message."""

    async def scenario(stub):
        raw = stub.channel.unary_unary("/pythonon.zk.v1.ZkService/DeleteCode")
        answers = []
        for metadata in (keys.metadata(ALICE), ()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(body, metadata=metadata)
            answers.append((refused.value.code(), refused.value.details()))
        return answers

    with caplog.at_level("INFO"):
        answers = call(keys, scenario)
    assert answers == [
        (grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid DeleteCodeRequest message"),
        (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid identity"),
    ], case
    assert "Traceback" not in caplog.text and "DecodeError" not in caplog.text
