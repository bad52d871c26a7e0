"""The requesting user's packages, through the packages service's public API (the channel forwards
the user's identity assertion): their requirement list for the prompt, and adding what generated
code needs when the request says installPackages (the packages service records each change)."""

from __future__ import annotations

import re

from pythonon.packages.v1 import packages_pb2, packages_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError, InvalidArgument, Unavailable

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def package_name(spec: str) -> str:
    """The PEP 503 normalised name of a requirement (e.g. "Requests[socks]>=2" -> "requests")."""
    match = _NAME.match(spec.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else spec.strip().lower()


class UserPackages:
    def __init__(self, address: str | None = None) -> None:
        self._channel = connect("packages", address)
        self._stub = packages_pb2_grpc.PackagesServiceStub(self._channel)

    async def specs(self) -> list[str]:
        """The user's requirements as they wrote them (e.g. "numpy>=2")."""
        try:
            listed = await self._stub.ListPackages(packages_pb2.ListPackagesRequest())
        except DomainError:
            raise Unavailable(
                "packages are unavailable right now, so no code was generated; retry later"
            ) from None
        return [package.spec or package.name for package in listed.packages]

    async def add(self, spec: str) -> None:
        """Add one requirement to the user's list (its environment is then built, as for POST
        /api/v1/packages); the packages service's refusal is passed on, naming the package."""
        try:
            await self._stub.AddPackage(packages_pb2.AddPackageRequest(package=spec))
        except InvalidArgument as refused:
            raise InvalidArgument(f"installPackages: {spec}: {refused.message}") from None

    async def close(self) -> None:
        await self._channel.close()
