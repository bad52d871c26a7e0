"""The executor's view of the secrets service: the values of the requesting user's secrets."""

from __future__ import annotations

from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, InvalidArgument, NotFound, Unavailable


class SecretsClient:
    def __init__(self, address: str | None = None, timeout_seconds: float = 5.0) -> None:
        self._channel = connect("secrets", address, timeout_seconds=timeout_seconds)
        self._stub = secrets_pb2_grpc.SecretsResolverServiceStub(self._channel)

    async def resolve(self, names: list[str] | None) -> dict[str, str]:
        """Values of the named secrets (None: all) of the user of the request in hand, whose identity
        assertion the channel forwards, so the secrets service resolves that user's and no one else's."""
        request = secrets_pb2.ResolveSecretsRequest(names=names or [], all=names is None)
        try:
            response = await self._stub.ResolveSecrets(request)
        except (NotFound, InvalidArgument) as error:
            raise InvalidArgument(f"secrets: {error.message}") from None
        except DomainError:
            raise Unavailable(
                "secrets are unavailable right now, so the code was not run; retry later"
            ) from None
        return dict(response.values)

    async def close(self) -> None:
        await self._channel.close()
