"""The zk service's settings, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    database_url,
    service_address,
    wiring_settings,
)

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("zk"),
    Setting(
        "PYTHONON_ZK_MAX_CODE_BYTES",
        "262144",
        "Largest code a stored payload may hold, in bytes (its ciphertext less the 16-byte tag); "
        "the executor's own limit still applies when it runs.",
    ),
    Setting("PYTHONON_ZK_MAX_PAYLOADS_PER_USER", "100", "Most encrypted payloads one user may store."),
    Setting(
        "PYTHONON_ZK_EXECUTE_TIMEOUT_SECONDS",
        "120",
        "How long an encrypted run may take through the executor, waiting in line included.",
    ),
    Setting(
        "PYTHONON_ZK_ENCRYPT_CONCURRENCY",
        "2",
        "Encrypt calls whose key derivation runs at once (each takes the payload's Argon2 memory).",
    ),
)


@dataclass(frozen=True)
class ZkSettings:
    database_url: str
    executor_address: str
    audit_address: str
    max_code_bytes: int = 256 * 1024
    max_payloads_per_user: int = 100
    execute_timeout_seconds: int = 120
    encrypt_concurrency: int = 2

    @classmethod
    def load(cls, env: Environment) -> ZkSettings:
        return cls(
            database_url=database_url(env, "zk"),
            executor_address=service_address(env, "executor"),
            audit_address=service_address(env, "audit"),
            max_code_bytes=env.integer("PYTHONON_ZK_MAX_CODE_BYTES", 256 * 1024, minimum=1),
            max_payloads_per_user=env.integer("PYTHONON_ZK_MAX_PAYLOADS_PER_USER", 100, minimum=1),
            execute_timeout_seconds=env.integer("PYTHONON_ZK_EXECUTE_TIMEOUT_SECONDS", 120, minimum=1),
            encrypt_concurrency=env.integer("PYTHONON_ZK_ENCRYPT_CONCURRENCY", 2, minimum=1),
        )


def load() -> tuple[ServerSettings, ZkSettings]:
    env = Environment()
    return ServerSettings.load("zk", env), ZkSettings.load(env)
