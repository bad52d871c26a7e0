"""The system service in-process on port 0, with fake grpc.health.v1 servers standing in for the
services it watches: exact responses, the 503 asked of the edge when degraded, the answer for
unbuilt sections, and the system service's own methods left alone."""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pythonon.auth.v1 import auth_pb2
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform.bootstrap import start_server
from services.platform.service_graph import HTTP_STATUS_HEADER, SECTIONS
from services.platform.settings import Environment, SettingsError, ephemeral_server_settings
from services.system.service import build
from services.system.settings import SystemSettings, parse_database_urls, parse_services
from services.system.unbuilt import UnbuiltSectionHandler
from tests.identity_keys import Keys, make_keys
from tests.postgres import throwaway_database

VERSION = importlib.metadata.version("pyth-on")
UNBUILT = {section: "not_built" for section in SECTIONS}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


@pytest.fixture()
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


@asynccontextmanager
async def fake_service(status: int = health_pb2.HealthCheckResponse.SERVING) -> AsyncIterator[str]:
    """A gRPC server with nothing but grpc.health.v1, reporting `status` for ""."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", status)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def stopped_service() -> str:
    """The address of a service that ran and has stopped: nothing listens there any more."""
    async with fake_service() as address:
        pass
    return address


@pytest.fixture()
def silent_address() -> Iterator[str]:
    """An address that accepts TCP connections but never answers (a hung service)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@asynccontextmanager
async def system_service(
    keys: Keys, services: dict[str, str], database_urls: tuple[str, ...] = ()
) -> AsyncIterator[grpc.aio.Channel]:
    """The system service as `python -m services.system` would build it, on port 0; yields a channel."""
    server_settings = ephemeral_server_settings("system", keys.public_key_file)
    parts = await build(server_settings, SystemSettings(services=services, database_urls=database_urls))
    server, _health, port = await start_server(server_settings, parts)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
        for close in parts.on_stop:
            await close()


async def health_of(channel: grpc.aio.Channel) -> tuple[system_pb2.HealthResponse, dict[str, str]]:
    """The response and the initial metadata (where the HTTP status request travels)."""
    call = system_pb2_grpc.SystemServiceStub(channel).Health(system_pb2.HealthRequest(), timeout=10)
    metadata = {key: value for key, value in (await call.initial_metadata() or ())}
    response = await call
    assert await call.code() == grpc.StatusCode.OK
    return response, metadata


@dataclass(frozen=True)
class CallDetails:
    """What a server hands a generic handler (grpc.HandlerCallDetails is only a protocol)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def call_to(method: str) -> Any:
    return CallDetails(method)


def as_dict(response: system_pb2.HealthResponse) -> dict[str, Any]:
    return {"status": response.status, "version": response.version, "services": dict(response.services)}


# -- Health ---------------------------------------------------------------------------------------


def test_health_is_ok_when_every_built_service_serves(keys: Keys) -> None:
    async def test() -> None:
        async with fake_service() as auth:
            async with system_service(keys, {"auth": auth}) as channel:
                response, metadata = await health_of(channel)
        assert as_dict(response) == {
            "status": "ok",
            "version": VERSION,
            "services": {**UNBUILT, "auth": "ok", "system": "ok"},
        }
        assert response.uptime_seconds >= 0
        assert HTTP_STATUS_HEADER not in metadata

    run(test)


def test_health_is_degraded_with_503_when_a_built_service_is_down(keys: Keys) -> None:
    async def test() -> None:
        auth = await stopped_service()
        async with system_service(keys, {"auth": auth}) as channel:
            response, metadata = await health_of(channel)
        assert as_dict(response) == {
            "status": "degraded",
            "version": VERSION,
            "services": {**UNBUILT, "auth": "down", "system": "ok"},
        }
        assert metadata[HTTP_STATUS_HEADER] == "503"

    run(test)


def test_a_service_that_reports_not_serving_is_down(keys: Keys) -> None:
    async def test() -> None:
        async with fake_service(health_pb2.HealthCheckResponse.NOT_SERVING) as auth:
            async with system_service(keys, {"auth": auth}) as channel:
                response, metadata = await health_of(channel)
        assert response.services["auth"] == "down"
        assert response.status == "degraded"
        assert metadata[HTTP_STATUS_HEADER] == "503"

    run(test)


def test_unbuilt_sections_do_not_degrade_health(keys: Keys) -> None:
    async def test() -> None:
        async with fake_service() as auth, system_service(keys, {"auth": auth}) as channel:
            response, metadata = await health_of(channel)
        assert response.status == "ok"
        assert {name for name, status in response.services.items() if status == "not_built"} == set(
            SECTIONS
        ) - {"auth", "system"}
        assert HTTP_STATUS_HEADER not in metadata

    run(test)


def test_hung_services_are_down_after_a_short_timeout_checked_concurrently(
    keys: Keys, silent_address: str
) -> None:
    async def test() -> None:
        async with system_service(keys, {"auth": silent_address, "executor": silent_address}) as channel:
            started = time.monotonic()
            response, _ = await health_of(channel)
            elapsed = time.monotonic() - started
        assert (response.services["auth"], response.services["executor"]) == ("down", "down")
        # Two hung services at a 1 s timeout each: concurrent checks finish well before 2 s.
        assert 0.9 <= elapsed < 1.8

    run(test)


def test_the_database_dependency_is_checked(keys: Keys, tmp_path: Path) -> None:
    present = tmp_path / "auth.db"
    sqlite3.connect(present).close()
    missing = tmp_path / "missing" / "nothing.db"

    async def test() -> None:
        async with fake_service() as auth:
            async with system_service(keys, {"auth": auth}, (f"sqlite:///{present}",)) as channel:
                healthy, _ = await health_of(channel)
            async with system_service(
                keys, {"auth": auth}, (f"sqlite:///{present}", f"sqlite:///{missing}")
            ) as channel:
                degraded, metadata = await health_of(channel)
        assert (healthy.status, healthy.services["database"]) == ("ok", "ok")
        assert (degraded.status, degraded.services["database"]) == ("degraded", "down")
        assert metadata[HTTP_STATUS_HEADER] == "503"

    run(test)


def test_checking_a_sqlite_database_never_creates_it(keys: Keys, tmp_path: Path) -> None:
    not_yet = tmp_path / "auth.db"

    async def test() -> None:
        async with system_service(keys, {}, (f"sqlite:///{not_yet}",)) as channel:
            response, _ = await health_of(channel)
        assert response.services["database"] == "down"

    run(test)
    assert not not_yet.exists()


# -- Info -----------------------------------------------------------------------------------------


def test_info_reports_name_version_limits_and_built_features(keys: Keys) -> None:
    async def test() -> None:
        async with system_service(keys, {"auth": "127.0.0.1:1"}) as channel:
            response = await system_pb2_grpc.SystemServiceStub(channel).Info(
                system_pb2.InfoRequest(), timeout=5
            )
        mib = 1024 * 1024
        assert response == system_pb2.InfoResponse(
            name="Pyth-On",
            version=VERSION,
            languages=[],
            limits=system_pb2.Limits(
                timeout_default_seconds=10,
                timeout_max_seconds=60,
                memory_mib=256,
                processes=64,
                output_bytes=1 * mib,
                file_bytes=16 * mib,
                tmp_bytes=64 * mib,
                code_bytes=256 * 1024,
                network=False,
            ),
            features={section: section in ("auth", "system") for section in SECTIONS},
            sandbox="",
        )

    run(test)


# -- Unbuilt sections -----------------------------------------------------------------------------


def test_an_unbuilt_section_answers_unimplemented_to_a_verified_caller(keys: Keys) -> None:
    async def test() -> None:
        async with system_service(keys, {"auth": "127.0.0.1:1"}) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Execute(
                    executor_pb2.ExecuteRequest(code="print(1)"), metadata=keys.assertion(), timeout=5
                )
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert refused.value.details() == "the executor API is not available in this version yet"

    run(test)


def test_an_unbuilt_section_still_requires_an_identity(keys: Keys) -> None:
    async def test() -> None:
        async with system_service(keys, {"auth": "127.0.0.1:1"}) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Execute(executor_pb2.ExecuteRequest(code="print(1)"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(test)


def test_a_built_section_served_elsewhere_is_not_claimed(keys: Keys) -> None:
    async def test() -> None:
        async with system_service(keys, {"auth": "127.0.0.1:1"}) as channel:
            login = channel.unary_unary(
                "/pythonon.auth.v1.AuthService/Login",
                request_serializer=auth_pb2.AuthRequest.SerializeToString,
                response_deserializer=auth_pb2.AuthResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await login(auth_pb2.AuthRequest(email="a@example.com", password="x"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not available in this version" not in (refused.value.details() or "")

    run(test)


def test_the_system_service_methods_are_not_shadowed(keys: Keys) -> None:
    # Even with no services listed (not even itself), the system section counts as built...
    settings = SystemSettings(services={})
    handler = UnbuiltSectionHandler(SECTIONS, settings.is_built)
    for method in ("Health", "Info"):
        assert handler.service(call_to(f"/pythonon.system.v1.SystemService/{method}")) is None

    async def test() -> None:
        # ...and its own methods answer through the server, next to the handler for unbuilt sections.
        async with system_service(keys, {}) as channel:
            info = await system_pb2_grpc.SystemServiceStub(channel).Info(system_pb2.InfoRequest(), timeout=5)
            response, _ = await health_of(channel)
        assert (info.name, info.features["system"]) == ("Pyth-On", True)
        assert response.status == "ok"

    run(test)


def test_the_unbuilt_handler_ignores_other_paths() -> None:
    handler = UnbuiltSectionHandler(SECTIONS, lambda section: section in ("auth", "system"))

    def claimed(method: str) -> bool:
        return handler.service(call_to(method)) is not None

    assert claimed("/pythonon.zk.v1.ZkService/Encrypt")
    assert claimed("/pythonon.secrets.v1.SecretsInternal/Resolve")
    assert not claimed("/pythonon.auth.v1.AuthService/Login")
    assert not claimed("/pythonon.system.v1.SystemService/Health")
    assert not claimed("/pythonon.nosuch.v1.Thing/Do")
    assert not claimed("/grpc.health.v1.Health/Check")


# -- Settings -------------------------------------------------------------------------------------


def test_settings_read_services_from_the_graphs_address_variables(keys: Keys) -> None:
    env = Environment(
        {
            "PYTHONON_AUTH_ADDRESS": " 127.0.0.1:5001 ",
            "PYTHONON_EXECUTOR_ADDRESS": "executor.pythonon.svc.cluster.local:50051",
            "PYTHONON_SYSTEM_DATABASE_URLS": "sqlite:////d/auth.db,postgresql://u:p@h/db,sqlite:////d/auth.db",
        }
    )
    settings = SystemSettings.load(env)
    assert dict(settings.services) == {
        "auth": "127.0.0.1:5001",
        "executor": "executor.pythonon.svc.cluster.local:50051",
    }
    assert settings.is_built("system") and settings.is_built("auth") and not settings.is_built("zk")
    assert settings.database_urls == ("sqlite:////d/auth.db", "postgresql://u:p@h/db")
    assert SystemSettings.load(Environment({})) == SystemSettings(services={}, database_urls=())


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "http://a:1/"])
def test_a_malformed_address_is_refused_naming_its_variable(address: str) -> None:
    with pytest.raises(SettingsError, match="PYTHONON_AUDIT_ADDRESS must be host:port"):
        parse_services(Environment({"PYTHONON_AUDIT_ADDRESS": address}))


def test_a_malformed_database_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError) as refused:
        parse_database_urls("sqlite:////d/auth.db,mysql://root:hunter2@db/x")
    assert "PYTHONON_SYSTEM_DATABASE_URLS: entry 2" in str(refused.value)
    assert "hunter2" not in str(refused.value)


@pytest.mark.postgres
def test_the_database_dependency_on_postgresql(keys: Keys) -> None:
    with throwaway_database() as url:
        gone = url.rpartition("/")[0] + "/pythonon_no_such_database"

        async def test() -> None:
            async with system_service(keys, {}, (url,)) as channel:
                healthy, _ = await health_of(channel)
            async with system_service(keys, {}, (url, gone)) as channel:
                degraded, metadata = await health_of(channel)
            assert (healthy.status, healthy.services["database"]) == ("ok", "ok")
            assert (degraded.status, degraded.services["database"]) == ("degraded", "down")
            assert metadata[HTTP_STATUS_HEADER] == "503"

        run(test)
