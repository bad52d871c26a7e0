"""The executor's view of the secrets service: the values of the requesting user's secrets."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

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


# How long, and for how many users at most, the executor keeps a user's resolved values.
KEEP_SECONDS = 30.0
KEEP_USERS = 1000


class KeptSecrets:
    """Each user's secret values as last resolved, kept while the user's marker holds the same stamp
    (the secrets service writes a new one before it acknowledges any change, and after an undo) and
    for at most KEEP_SECONDS (a change made in Vault by other means shows within that); the
    KEEP_USERS users who ran last. Values live in this process's memory only, as they do during
    a run."""

    def __init__(
        self,
        seconds: float = KEEP_SECONDS,
        users: int = KEEP_USERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds = seconds
        self._users = users
        self._clock = clock
        self._kept: OrderedDict[str, tuple[str, float, dict[str, str]]] = OrderedDict()

    def get(self, user_id: str, stamp: str) -> dict[str, str] | None:
        kept = self._kept.get(user_id)
        if kept is None:
            return None
        kept_stamp, until, values = kept
        if kept_stamp != stamp or self._clock() >= until:
            del self._kept[user_id]
            return None
        self._kept.move_to_end(user_id)
        return dict(values)

    def keep(self, user_id: str, stamp: str, values: dict[str, str]) -> None:
        self._kept[user_id] = (stamp, self._clock() + self._seconds, dict(values))
        self._kept.move_to_end(user_id)
        while len(self._kept) > self._users:
            self._kept.popitem(last=False)
