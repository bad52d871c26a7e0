"""gRPC servicer of the zk service: read the request, call the logic, build the response."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from pythonon.executor.v1 import executor_pb2
from pythonon.zk.v1 import zk_pb2, zk_pb2_grpc

from services.platform.errors import InvalidArgument
from services.platform.identity import require_identity
from services.zk import recipe
from services.zk.stored_code import CodeMetadata, EncryptedCode, EncryptedRun


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _metadata(metadata: CodeMetadata) -> zk_pb2.EncryptedCodeMetadata:
    return zk_pb2.EncryptedCodeMetadata(
        name=metadata.name,
        language=metadata.language,
        size=metadata.size,
        sha256=metadata.sha256,
        created_at=_timestamp(metadata.created_at),
        updated_at=_timestamp(metadata.updated_at),
    )


def to_message(payload: recipe.ZkPayload) -> zk_pb2.ZKPayload:
    return zk_pb2.ZKPayload(
        version=payload.version,
        algorithm=payload.algorithm,
        salt=payload.salt,
        nonce=payload.nonce,
        ciphertext=payload.ciphertext,
        kdf=zk_pb2.KdfParams(
            memory_kib=payload.kdf.memory_kib,
            iterations=payload.kdf.iterations,
            parallelism=payload.kdf.parallelism,
        ),
    )


def from_message(message: zk_pb2.ZKPayload) -> recipe.ZkPayload:
    kdf = message.kdf
    return recipe.ZkPayload(
        version=message.version,
        algorithm=message.algorithm,
        salt=message.salt,
        nonce=message.nonce,
        ciphertext=message.ciphertext,
        kdf=recipe.KdfParams(kdf.memory_kib, kdf.iterations, kdf.parallelism),
    )


def _secret_names(request: zk_pb2.ExecuteCodeRequest) -> list[str] | None:
    """`secrets` absent means all of the user's secrets; a list names some (possibly none)."""
    if not request.HasField("secrets"):
        return None
    names = []
    for value in request.secrets.values:
        if value.WhichOneof("kind") != "string_value":
            raise InvalidArgument("secrets must be a list of secret names")
        names.append(value.string_value)
    return names


class ZkServicer(zk_pb2_grpc.ZkServiceServicer):
    def __init__(self, code: EncryptedCode) -> None:
        self._code = code

    async def Encrypt(  # noqa: N802 (gRPC method name)
        self, request: zk_pb2.EncryptRequest, context: grpc.aio.ServicerContext
    ) -> zk_pb2.ZKPayload:
        require_identity()
        return to_message(await self._code.encrypt(request.code, request.password))

    async def PutCode(  # noqa: N802 (gRPC method name)
        self, request: zk_pb2.PutCodeRequest, context: grpc.aio.ServicerContext
    ) -> zk_pb2.EncryptedCodeMetadata:
        if not request.HasField("payload"):
            raise InvalidArgument("a payload is required")
        metadata = await self._code.put(
            require_identity(), request.name, from_message(request.payload), request.language
        )
        return _metadata(metadata)

    async def DeleteCode(  # noqa: N802 (gRPC method name)
        self, request: zk_pb2.DeleteCodeRequest, context: grpc.aio.ServicerContext
    ) -> zk_pb2.DeleteCodeResponse:
        await self._code.delete(require_identity(), request.name)
        return zk_pb2.DeleteCodeResponse()

    async def ListCode(  # noqa: N802 (gRPC method name)
        self, request: zk_pb2.ListCodeRequest, context: grpc.aio.ServicerContext
    ) -> zk_pb2.ListCodeResponse:
        items = await self._code.list(require_identity())
        return zk_pb2.ListCodeResponse(items=[_metadata(item) for item in items])

    async def Execute(  # noqa: N802 (gRPC method name)
        self, request: zk_pb2.ExecuteCodeRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        run = EncryptedRun(
            password=request.password,
            stdin=request.stdin,
            timeout_seconds=request.timeout if request.HasField("timeout") else None,
            env=dict(request.env),
            secret_names=_secret_names(request),
        )
        return await self._code.execute(require_identity(), request.name, run)
