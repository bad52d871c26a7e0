"""Reading a service's settings from its environment once, at start-up, into typed values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.platform import service_graph


class SettingsError(Exception):
    """A setting is missing or malformed; the service refuses to start."""


class Environment:
    """Typed accessors over an environment mapping that name the variable in every error."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def text(self, name: str, default: str | None = None) -> str:
        value = self._environ.get(name, default)
        if value is None or value == "":
            if default is not None:
                return default
            raise SettingsError(f"{name} is required but not set")
        return value

    def integer(self, name: str, default: int | None = None, *, minimum: int = 0) -> int:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            if default is None:
                raise SettingsError(f"{name} is required but not set")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        return value

    def port(self, name: str, default: int | None = None) -> int:
        value = self.integer(name, default)
        if not 0 <= value <= 65535:
            raise SettingsError(f"{name} must be a TCP port (0-65535), got {value}")
        return value

    def existing_file(self, name: str) -> Path:
        path = Path(self.text(name))
        if not path.is_file():
            raise SettingsError(f"{name} names {path}, which is not a readable file")
        return path

    def optional(self, name: str) -> str | None:
        return self._environ.get(name) or None


@dataclass(frozen=True)
class ServerSettings:
    """What every service needs: where to listen, how to log, how to verify identity."""

    service: str
    host: str
    port: int
    log_level: str
    identity_public_key_file: Path
    otlp_endpoint: str | None
    shutdown_grace_seconds: float

    @classmethod
    def load(cls, service: str, env: Environment) -> ServerSettings:
        level = env.text("PYTHONON_LOG_LEVEL", "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"PYTHONON_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        return cls(
            service=service,
            host=env.text("PYTHONON_HOST", "127.0.0.1"),
            port=env.port("PYTHONON_PORT"),
            log_level=level,
            identity_public_key_file=env.existing_file("PYTHONON_IDENTITY_PUBLIC_KEY_FILE"),
            otlp_endpoint=env.optional("OTEL_EXPORTER_OTLP_ENDPOINT"),
            shutdown_grace_seconds=float(env.integer("PYTHONON_SHUTDOWN_GRACE_SECONDS", 5)),
        )


def ephemeral_server_settings(service: str, identity_public_key_file: Path) -> ServerSettings:
    """Settings for a server on a free loopback port, stopped at once: in-process tests and tools."""
    return ServerSettings(
        service=service,
        host="127.0.0.1",
        port=0,
        log_level="INFO",
        identity_public_key_file=identity_public_key_file,
        otlp_endpoint=None,
        shutdown_grace_seconds=0,
    )


def database_url(env: Environment, service: str) -> str:
    """The service's SQLAlchemy URL: PYTHONON_<SERVICE>_DATABASE_URL, else PYTHONON_DATABASE_URL."""
    specific = service_graph.database_variable(service)
    url = env.optional(specific) or env.optional("PYTHONON_DATABASE_URL")
    if not url:
        raise SettingsError(f"{specific} (or PYTHONON_DATABASE_URL) is required but not set")
    if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise SettingsError(f"{specific} must be a sqlite:// or postgresql:// URL")
    return url


def service_address(env: Environment, service: str) -> str:
    """host:port of a service this one calls, from the variable the service graph names for it
    (e.g. PYTHONON_AUDIT_ADDRESS); SettingsError naming the variable when it is missing or malformed."""
    variable = service_graph.address_variable(service)
    address = env.text(variable).strip()
    try:
        service_graph.split_address(address)
    except ValueError as error:
        raise SettingsError(f"{variable}: {error}") from None
    return address
