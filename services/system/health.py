"""Aggregated health: every built service's gRPC health and every core dependency, checked
concurrently with a short timeout, so /health answers quickly even when something hangs."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from services.platform.client import connect
from services.platform.db import normalize_url
from services.platform.errors import DomainError

log = logging.getLogger("pythonon.system.health")

OK = "ok"
DOWN = "down"
NOT_BUILT = "not_built"
# Running, but its API cannot serve until the operator configures it (e.g. the generator without an
# API key); it does not degrade the whole, since everything else works.
NOT_CONFIGURED = "not_configured"
DEGRADED = "degraded"
DATABASE = "database"
VAULT = "vault"

DEFAULT_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class HealthReport:
    """`services` maps every section and dependency to "ok", "down", "not_built" or "not_configured"."""

    status: str
    version: str
    services: Mapping[str, str]
    uptime_seconds: float

    @property
    def degraded(self) -> bool:
        return self.status != OK


class ServiceProbe:
    """Asks one service's grpc.health.v1 for the overall ("") status over a kept-open channel
    (whose short reconnect back-off lets a restarted service read "ok" on the next check); with
    `api_service` (a service that may run unconfigured), also that servicer's own status: NOT_SERVING
    there while the server serves means "not_configured"."""

    def __init__(self, service: str, address: str, timeout: float, api_service: str | None = None) -> None:
        self._channel = connect(service, address, timeout_seconds=timeout)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._api_service = api_service

    async def status(self) -> str:
        """OK, DOWN or NOT_CONFIGURED."""
        if not await self._serving(""):
            return DOWN
        if self._api_service is not None and not await self._serving(self._api_service):
            return NOT_CONFIGURED
        return OK

    async def _serving(self, name: str) -> bool:
        try:
            # wait_for_ready: a channel still in reconnect back-off gets the whole timeout to connect.
            response = await self._stub.Check(
                health_pb2.HealthCheckRequest(service=name), wait_for_ready=True
            )
        except DomainError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()


def _engine_url(url: str) -> URL:
    """SQLite URLs are opened read-only so a health check never creates a database file that the
    owning service has not created yet. (A URL object, not a string: no second round of unquoting.)"""
    parsed = make_url(normalize_url(url))
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return parsed
    if database.startswith("file:"):
        return parsed
    return parsed.set(
        database="file:" + urllib.parse.quote(database), query={**parsed.query, "mode": "ro", "uri": "true"}
    )


class DatabaseProbe:
    """`SELECT 1` on each database URL, in a worker thread; fresh connections so a check never
    trusts a pooled connection that the server has since dropped."""

    def __init__(self, urls: Iterable[str], timeout: float) -> None:
        self._timeout = timeout
        self._engines: list[Engine] = [self._engine(url) for url in urls]

    def _engine(self, url: str) -> Engine:
        engine_url = _engine_url(url)
        connect_args: dict[str, object] = {}
        if engine_url.get_backend_name() == "sqlite":
            connect_args["timeout"] = self._timeout
        elif engine_url.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = max(1, round(self._timeout))
        # Parameters hidden as in every engine of the mesh (platform.db), though this one binds none.
        return sa.create_engine(
            engine_url, poolclass=NullPool, connect_args=connect_args, hide_parameters=True
        )

    @staticmethod
    def _select_one(engine: Engine) -> None:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    async def _one_healthy(self, engine: Engine) -> bool:
        try:
            # The thread may outlive the timeout, but the driver's own timeout ends it soon after.
            await asyncio.wait_for(asyncio.to_thread(self._select_one, engine), self._timeout + 1)
        except (TimeoutError, sa.exc.SQLAlchemyError) as error:
            log.warning("database check failed", extra={"error": type(error).__name__})
            return False
        return True

    async def status(self) -> str:
        results = await asyncio.gather(*(self._one_healthy(engine) for engine in self._engines))
        return OK if all(results) else DOWN

    async def close(self) -> None:
        for engine in self._engines:
            engine.dispose()


class VaultProbe:
    """Vault's unauthenticated /v1/sys/health: ok when it answers 200 (initialised, unsealed, active or
    a standby that can serve); sealed, uninitialised or unreachable is down."""

    def __init__(self, address: str, timeout: float) -> None:
        query = urllib.parse.urlencode({"standbyok": "true", "perfstandbyok": "true"})
        self._url = f"{address.rstrip('/')}/v1/sys/health?{query}"
        self._timeout = timeout
        # Straight to Vault: a proxy from the environment must not stand in between.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _status(self) -> int:
        try:
            with self._opener.open(self._url, timeout=self._timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    async def status(self) -> str:
        try:
            status = await asyncio.wait_for(asyncio.to_thread(self._status), self._timeout + 1)
        except (TimeoutError, OSError) as error:
            log.warning("vault check failed", extra={"error": type(error).__name__})
            return DOWN
        if status != 200:
            log.warning("vault check failed", extra={"status": status})
        return OK if status == 200 else DOWN


class HealthChecker:
    """Checks the built services and the core dependencies; sections without a server are
    reported "not_built", and services running unconfigured "not_configured": neither degrades
    the whole. `api_services`: for a service that may run unconfigured, the servicer whose health
    says whether it is configured."""

    def __init__(
        self,
        *,
        sections: Iterable[str],
        services: Mapping[str, str],
        database_urls: Iterable[str],
        version: str,
        vault_address: str | None = None,
        own_section: str | None = None,
        api_services: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sections = list(sections)
        # The section the checker itself serves: it is up, since it is answering.
        self._own_section = own_section
        api_services = api_services or {}
        self._probes = {
            name: ServiceProbe(name, address, timeout, api_services.get(name))
            for name, address in services.items()
        }
        urls = list(database_urls)
        self._database = DatabaseProbe(urls, timeout) if urls else None
        self._vault = VaultProbe(vault_address, timeout) if vault_address else None
        self._version = version
        self._clock = clock
        self._started = clock()

    async def check(self) -> HealthReport:
        """Run every check concurrently and aggregate them."""
        names = list(self._probes)
        checks = [self._probes[name].status() for name in names]
        if self._database is not None:
            names.append(DATABASE)
            checks.append(self._database.status())
        if self._vault is not None:
            names.append(VAULT)
            checks.append(self._vault.status())
        results = dict(zip(names, await asyncio.gather(*checks), strict=True))

        statuses = {section: NOT_BUILT for section in self._sections}
        if self._own_section is not None:
            statuses[self._own_section] = OK
        statuses.update(results)
        return HealthReport(
            status=OK if all(status in (OK, NOT_CONFIGURED) for status in results.values()) else DEGRADED,
            version=self._version,
            services=statuses,
            uptime_seconds=round(self._clock() - self._started, 3),
        )

    async def close(self) -> None:
        for probe in self._probes.values():
            await probe.close()
        if self._database is not None:
            await self._database.close()
