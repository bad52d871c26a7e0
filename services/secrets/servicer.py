"""gRPC servicers of the secrets service: read the request, call the logic, build the response."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.platform.identity import require_identity
from services.secrets.user_secrets import UserSecrets
from services.secrets.vault import SecretRecord


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _metadata(record: SecretRecord) -> secrets_pb2.SecretMetadata:
    return secrets_pb2.SecretMetadata(
        name=record.name,
        description=record.description,
        version=record.version,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
    )


class SecretsServicer(secrets_pb2_grpc.SecretsServiceServicer):
    """The public API: values go in, only metadata comes out."""

    def __init__(self, secrets: UserSecrets) -> None:
        self._secrets = secrets

    async def PutSecret(  # noqa: N802 (gRPC method name)
        self, request: secrets_pb2.PutSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.SecretMetadata:
        record = await self._secrets.put(
            require_identity(), request.name, request.secret.value, request.secret.description
        )
        return _metadata(record)

    async def DeleteSecret(  # noqa: N802 (gRPC method name)
        self, request: secrets_pb2.DeleteSecretRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.DeleteSecretResponse:
        await self._secrets.delete(require_identity(), request.name)
        return secrets_pb2.DeleteSecretResponse()

    async def ListSecrets(  # noqa: N802 (gRPC method name)
        self, request: secrets_pb2.ListSecretsRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.ListSecretsResponse:
        records = await self._secrets.list(require_identity())
        return secrets_pb2.ListSecretsResponse(secrets=[_metadata(record) for record in records])


class SecretsResolverServicer(secrets_pb2_grpc.SecretsResolverServiceServicer):
    """Internal (the edge does not route it): values for the executor, of the assertion's user only."""

    def __init__(self, secrets: UserSecrets) -> None:
        self._secrets = secrets

    async def ResolveSecrets(  # noqa: N802 (gRPC method name)
        self, request: secrets_pb2.ResolveSecretsRequest, context: grpc.aio.ServicerContext
    ) -> secrets_pb2.ResolveSecretsResponse:
        values = await self._secrets.resolve(require_identity(), request.names, request.all)
        return secrets_pb2.ResolveSecretsResponse(values=values)
