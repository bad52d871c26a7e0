"""gRPC servicers of the packages service: read the request, call the logic, build the response."""

from __future__ import annotations

import math

import grpc
from pythonon.packages.v1 import packages_pb2, packages_pb2_grpc

from services.packages.user_packages import PackageView, UserPackages
from services.platform.errors import InvalidArgument
from services.platform.identity import require_identity

# The longest an internal caller may ask GetEnvironment to wait.
MAX_WAIT_SECONDS = 120.0


def _list(views: list[PackageView]) -> packages_pb2.PackageList:
    return packages_pb2.PackageList(
        packages=[
            packages_pb2.PackageInfo(
                name=view.name, spec=view.spec, version=view.version, status=view.status, reason=view.reason
            )
            for view in views
        ]
    )


class PackagesServicer(packages_pb2_grpc.PackagesServiceServicer):
    """The public API: the caller's own list."""

    def __init__(self, packages: UserPackages) -> None:
        self._packages = packages

    async def ListPackages(  # noqa: N802 (gRPC method name)
        self, request: packages_pb2.ListPackagesRequest, context: grpc.aio.ServicerContext
    ) -> packages_pb2.PackageList:
        return _list(await self._packages.list_packages(require_identity()))

    async def SetPackages(  # noqa: N802 (gRPC method name)
        self, request: packages_pb2.SetPackagesRequest, context: grpc.aio.ServicerContext
    ) -> packages_pb2.PackageList:
        return _list(await self._packages.set_packages(require_identity(), list(request.packages)))

    async def AddPackage(  # noqa: N802 (gRPC method name)
        self, request: packages_pb2.AddPackageRequest, context: grpc.aio.ServicerContext
    ) -> packages_pb2.PackageList:
        return _list(await self._packages.add_package(require_identity(), request.package))

    async def RemovePackage(  # noqa: N802 (gRPC method name)
        self, request: packages_pb2.RemovePackageRequest, context: grpc.aio.ServicerContext
    ) -> packages_pb2.PackageList:
        return _list(await self._packages.remove_package(require_identity(), request.name))


class PackagesResolverServicer(packages_pb2_grpc.PackagesResolverServiceServicer):
    """Internal (the edge does not route it): the environment of the assertion's user only."""

    def __init__(self, packages: UserPackages) -> None:
        self._packages = packages

    async def GetEnvironment(  # noqa: N802 (gRPC method name)
        self, request: packages_pb2.GetEnvironmentRequest, context: grpc.aio.ServicerContext
    ) -> packages_pb2.PackageEnvironment:
        wait = request.wait_seconds
        if not math.isfinite(wait) or wait < 0 or wait > MAX_WAIT_SECONDS:
            raise InvalidArgument(f"wait_seconds must be between 0 and {MAX_WAIT_SECONDS:g}")
        view = await self._packages.environment(require_identity(), wait)
        return packages_pb2.PackageEnvironment(
            status=view.status,
            environment_key=view.environment_key,
            path=view.path,
            ready=view.ready,
            total=view.total,
            reason=view.reason,
        )
