"""The system service's settings: which services are built and where, and which databases to check."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.platform import service_graph
from services.platform.settings import Environment, ServerSettings, Setting, SettingsError, wiring_settings

DATABASE_URLS_VARIABLE = "PYTHONON_SYSTEM_DATABASE_URLS"
VAULT_ADDRESS_VARIABLE = "PYTHONON_SYSTEM_VAULT_ADDR"

# The address variables say which services are built here: a service without one is "not_built".
SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("system", built_only=False),
    Setting(
        DATABASE_URLS_VARIABLE,
        None,
        'Comma-separated SQLAlchemy URLs of the services\' databases, checked by /health ("database").',
        wired=True,
    ),
    Setting(
        VAULT_ADDRESS_VARIABLE,
        None,
        'Base URL of the Vault the secrets service uses, checked by /health ("vault"); unset: not checked.',
        wired=True,
    ),
)
_DATABASE_SCHEMES = ("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")


@dataclass(frozen=True)
class SystemSettings:
    """`services`: section name → "host:port" of its gRPC server, for every built section but the
    system service itself.
    `database_urls`: the SQLAlchemy URLs the services use (the "database" dependency).
    `vault_address`: the Vault the secrets service uses (the "vault" dependency), if any."""

    services: Mapping[str, str] = field(default_factory=dict)
    database_urls: tuple[str, ...] = ()
    vault_address: str | None = None

    @classmethod
    def load(cls, env: Environment) -> SystemSettings:
        return cls(
            services=parse_services(env),
            database_urls=parse_database_urls(env.optional(DATABASE_URLS_VARIABLE) or ""),
            vault_address=parse_vault_address(env.optional(VAULT_ADDRESS_VARIABLE) or ""),
        )

    def is_built(self, section: str) -> bool:
        """A section is built when it has a server; the system service itself always is."""
        return section == "system" or section in self.services


def parse_services(env: Environment) -> dict[str, str]:
    """Where every service the system service watches listens, from the address variables the
    service graph names (e.g. PYTHONON_AUTH_ADDRESS); a service without one is not built here."""
    services: dict[str, str] = {}
    for name in service_graph.calls("system", built_only=False):
        variable = service_graph.address_variable(name)
        address = (env.optional(variable) or "").strip()
        if not address:
            continue
        try:
            service_graph.split_addresses(address)
        except ValueError as error:
            raise SettingsError(
                f"{variable} must be host:port (or its replicas', comma-separated): {error}"
            ) from None
        services[name] = address
    return services


def parse_database_urls(raw: str) -> tuple[str, ...]:
    """Comma-separated SQLAlchemy URLs, duplicates dropped, order kept."""
    urls: list[str] = []
    for position, url in enumerate((part.strip() for part in raw.split(",")), start=1):
        if not url:
            continue
        if not url.startswith(_DATABASE_SCHEMES):
            # The URL itself is not echoed: it may carry a password.
            raise SettingsError(
                f"{DATABASE_URLS_VARIABLE}: entry {position} is not a sqlite:// or postgresql:// URL"
            )
        if url not in urls:
            urls.append(url)
    return tuple(urls)


def parse_vault_address(raw: str) -> str | None:
    """Vault's base URL (http:// or https://), or None when no Vault is watched."""
    address = raw.strip().rstrip("/")
    if not address:
        return None
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(f"{VAULT_ADDRESS_VARIABLE} must be an http:// or https:// URL, got {raw!r}")
    return address


def load_settings() -> tuple[ServerSettings, SystemSettings]:
    """Read and validate everything the system service needs from the process environment."""
    env = Environment()
    return ServerSettings.load("system", env), SystemSettings.load(env)
