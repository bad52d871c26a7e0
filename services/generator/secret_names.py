"""The names of the requesting user's secrets, through the secrets service's public ListSecrets (the
channel forwards the user's identity assertion): metadata only, so no value ever reaches the
generator."""

from __future__ import annotations

from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, Unavailable


class SecretNames:
    def __init__(self, address: str | None = None) -> None:
        self._channel = connect("secrets", address)
        self._stub = secrets_pb2_grpc.SecretsServiceStub(self._channel)

    async def list(self) -> list[str]:
        """The user's secret names, sorted."""
        try:
            response = await self._stub.ListSecrets(secrets_pb2.ListSecretsRequest())
        except DomainError:
            raise Unavailable(
                "secrets are unavailable right now, so no code was generated; retry later"
            ) from None
        return sorted(secret.name for secret in response.secrets)

    async def close(self) -> None:
        await self._channel.close()
