"""The packages service process: `python -m services.packages`."""

from __future__ import annotations

import asyncio

from pythonon.packages.v1 import packages_pb2, packages_pb2_grpc

from services.executor.sandbox import SandboxBackend, SandboxUnavailable, create_backend
from services.packages import settings as packages_settings
from services.packages import storage
from services.packages.builds import Builds
from services.packages.environments import BuildLimits, EnvironmentStore, Installer, Target
from services.packages.servicer import PackagesResolverServicer, PackagesServicer
from services.packages.settings import PackagesSettings
from services.packages.source_builds import SourceBuilder, SourceBuildLimits, default_index
from services.packages.user_packages import UserPackages
from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.db import Database, Schema
from services.platform.settings import ServerSettings, SettingsError


async def build(server: ServerSettings, settings: PackagesSettings) -> ServiceParts:
    """Wire the packages service's parts; interrupted builds start again (tests call this too)."""
    db = Database(settings.database_url)
    db.require_at_head(Schema("packages"))  # `pyth-on migrate` brings it there, once
    target = await asyncio.to_thread(Target.probe, settings.python)
    store = await asyncio.to_thread(EnvironmentStore, settings.store)
    source_sandbox = await _source_build_sandbox(settings, target) if settings.source_builds else None
    source_builder = None
    if source_sandbox is not None:
        index_url = settings.index_url or await asyncio.to_thread(default_index, settings.uv)
        if index_url is None:
            await source_sandbox.close()
            raise SettingsError(
                "source builds need PYTHONON_PACKAGES_INDEX_URL (uv did not say its default index)"
            )
        source_builder = SourceBuilder(
            source_sandbox,
            settings.store,
            index_url,
            SourceBuildLimits(
                seconds=settings.max_build_seconds,
                memory_bytes=settings.source_build_memory_bytes,
                disk_bytes=settings.source_build_disk_bytes,
            ),
        )
    installer = Installer(
        uv=settings.uv, index_url=settings.index_url, cache_dir=store.cache, source_builder=source_builder
    )
    await installer.warm_up(target)
    builds = Builds(
        db,
        store,
        installer,
        target,
        BuildLimits(max_bytes=settings.max_environment_bytes, max_seconds=settings.max_build_seconds),
        settings.max_concurrent_builds,
    )
    audit = AuditClient(settings.audit_address)
    target_key = f"{target.version} {target.platform} {settings.index_url or 'default index'}"
    packages = UserPackages(db, store, builds, audit, target_key)
    # The database is the truth: the executor's markers follow it, lost builds start again.
    await asyncio.to_thread(store.reconcile_markers, await db.run(storage.users_with_packages))
    await builds.resume()
    builds.collect_soon()

    async def close() -> None:
        await builds.close()
        if source_sandbox is not None:
            await source_sandbox.close()
        await audit.close()
        db.dispose()

    services = packages_pb2.DESCRIPTOR.services_by_name
    return ServiceParts(
        servicers=[
            Servicer(
                packages_pb2_grpc.add_PackagesServiceServicer_to_server,
                PackagesServicer(packages),
                services["PackagesService"].full_name,
            ),
            Servicer(
                packages_pb2_grpc.add_PackagesResolverServiceServicer_to_server,
                PackagesResolverServicer(packages),
                services["PackagesResolverService"].full_name,
            ),
        ],
        on_stop=[close],
    )


async def _source_build_sandbox(settings: PackagesSettings, target: Target) -> SandboxBackend:
    """The executor's bubblewrap backend, used as a library: python only, no warm sandboxes (builds
    are rare), runs up to the build's time limit; refuses to start the service when it cannot run."""
    try:
        sandbox = create_backend(
            "bwrap",
            pool_size=0,
            languages=("python",),
            executables={"python": target.python},
            max_concurrent=settings.max_concurrent_builds,
            max_runs_per_user=settings.max_concurrent_builds,
            max_timeout_seconds=settings.max_build_seconds,
            max_queue_seconds=settings.max_build_seconds,
        )
        await sandbox.start()
    except SandboxUnavailable as error:
        raise SettingsError(
            f"PYTHONON_PACKAGES_SOURCE_BUILDS is true but no sandbox can run here: {error}"
        ) from None
    return sandbox


DEFINITION = ServiceDefinition(name="packages", load_settings=packages_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
