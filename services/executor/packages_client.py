"""The executor's view of the packages service: the requesting user's package environment, as the
read-only mount and the PYTHONPATH a run gets.

A user without packages costs one stat: the packages service keeps a marker file per user with a
non-empty list in the store both share (written before it acknowledges a change, removed when the
list empties), and only a marked user's run asks the service anything. The marker holds the key
of the set the user's list makes: a ready environment answered for that key is kept, and the next
runs with the same key and the environment still in place ask nothing either (a list changed, even
back to an earlier one, is a new answer; an environment collected is no longer in place)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pythonon.packages.v1 import packages_pb2, packages_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, FailedPrecondition, Unavailable
from services.platform.package_store import ENVIRONMENTS, SANDBOX_MOUNT, user_markers

# The languages whose runs can import Python packages (bash runs python3 too).
LANGUAGES_WITH_PACKAGES = frozenset({"python", "bash"})
# Added to the wait for a build: the time the call itself may take.
_CALL_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class RunPackages:
    """What a run gets of its user's packages: mounts and environment variables (none: no packages)."""

    readonly_paths: tuple[tuple[str, str], ...] = ()
    env: dict[str, str] = field(default_factory=dict)


NO_PACKAGES = RunPackages()


class PackagesClient:
    def __init__(self, address: str | None, store: Path | None, wait_seconds: float) -> None:
        """`store`: the package environments' directory (None: packages are off, nothing is asked)."""
        self._environments = os.path.realpath(store / ENVIRONMENTS) if store is not None else ""
        self._markers = user_markers(store) if store is not None else None
        self._wait_seconds = wait_seconds
        self._channel = connect("packages", address) if store is not None else None
        self._stub = packages_pb2_grpc.PackagesResolverServiceStub(self._channel) if self._channel else None
        # user id -> (the set key its marker held, the ready environment's path) of its last answer
        self._ready: dict[str, tuple[str, str]] = {}

    async def for_run(self, user_id: str, language: str) -> RunPackages:
        """The user's ready environment for a run in `language`; FailedPrecondition while it is still
        building after the wait, or when its build failed (with the reason)."""
        if self._stub is None or self._markers is None or language not in LANGUAGES_WITH_PACKAGES:
            return NO_PACKAGES
        try:
            set_key = self._markers.path(user_id).read_text()
        except FileNotFoundError:
            self._ready.pop(user_id, None)
            return NO_PACKAGES
        known = self._ready.get(user_id)
        if known is not None and known[0] == set_key and os.path.isdir(known[1]):
            return _mounted(known[1])
        request = packages_pb2.GetEnvironmentRequest(wait_seconds=self._wait_seconds)
        try:
            environment = await self._stub.GetEnvironment(
                request, timeout=self._wait_seconds + _CALL_MARGIN_SECONDS
            )
        except DomainError:
            raise Unavailable(
                "the package service is unavailable right now, so the code was not run; retry later"
            ) from None
        if environment.status == "none":
            return NO_PACKAGES  # the list was emptied since the marker was read
        if environment.status == "failed":
            raise FailedPrecondition(
                f"the package environment failed to build: {environment.reason}; change the package list "
                "to try again"
            )
        if environment.status != "ready":
            raise FailedPrecondition(
                f"the package environment is still building: {environment.ready} of {environment.total} "
                "ready; retry shortly"
            )
        path = os.path.realpath(environment.path)
        if os.path.dirname(os.path.dirname(path)) != self._environments:
            raise Unavailable(
                "the package service named an environment outside its store; the code was not run"
            )
        if set_key:
            self._ready[user_id] = (set_key, path)
        return _mounted(path)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _mounted(path: str) -> RunPackages:
    return RunPackages(readonly_paths=((path, SANDBOX_MOUNT),), env={"PYTHONPATH": SANDBOX_MOUNT})
