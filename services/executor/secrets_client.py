"""The executor's view of the secrets service: the values of the requesting user's secrets."""

from __future__ import annotations

import grpc
from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from edge.config import IDENTITY_HEADER
from services.platform.errors import InvalidArgument, Unavailable
from services.platform.identity import request_scope


class SecretsClient:
    def __init__(self, address: str, timeout_seconds: float = 5.0) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = secrets_pb2_grpc.SecretsResolverServiceStub(self._channel)
        self._timeout = timeout_seconds

    async def resolve(self, names: list[str] | None) -> dict[str, str]:
        """Values of the named secrets (None: all) of the user of the request in hand, whose identity
        assertion is forwarded, so the secrets service resolves that user's and no one else's."""
        request = secrets_pb2.ResolveSecretsRequest(names=names or [], all=names is None)
        metadata = [(IDENTITY_HEADER, request_scope().assertion)]
        try:
            response = await self._stub.ResolveSecrets(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise InvalidArgument(f"secrets: {error.details()}") from None
            raise Unavailable(
                "secrets are unavailable right now, so the code was not run; retry later"
            ) from None
        return dict(response.values)

    async def close(self) -> None:
        await self._channel.close()
