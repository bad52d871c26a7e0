"""The secrets service's settings, read once at start-up."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from services.platform.sandbox_environment import MAX_SECRETS_PER_USER
from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    service_address,
    wiring_settings,
)

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("secrets"),
    Setting(
        "PYTHONON_SECRETS_VAULT_ADDR",
        None,
        "Vault's or OpenBao's base URL, http:// or https:// (`pyth-on up`: the local OpenBao).",
        wired=True,
    ),
    Setting(
        "PYTHONON_SECRETS_VAULT_TOKEN_FILE",
        None,
        "File holding a Vault token (re-read whenever Vault refuses it). Exactly one of this and "
        "PYTHONON_SECRETS_VAULT_ROLE_ID_FILE (`pyth-on up`: a policy-limited token it issues).",
        wired=True,
    ),
    Setting(
        "PYTHONON_SECRETS_VAULT_ROLE_ID_FILE",
        None,
        "File holding an AppRole role id, to log in with AppRole.",
    ),
    Setting(
        "PYTHONON_SECRETS_VAULT_SECRET_ID_FILE",
        None,
        "File holding the AppRole secret id (needs PYTHONON_SECRETS_VAULT_ROLE_ID_FILE).",
    ),
    Setting("PYTHONON_SECRETS_VAULT_APPROLE_MOUNT", "approle", "Mount path of Vault's AppRole auth method."),
    Setting("PYTHONON_SECRETS_VAULT_MOUNT", "secret", "Mount path of the KV version 2 secrets engine."),
    Setting(
        "PYTHONON_SECRETS_VAULT_PATH_PREFIX",
        "pythonon/users",
        "Path under the mount where users' secrets live.",
    ),
    Setting("PYTHONON_SECRETS_VAULT_CA_FILE", None, "CA bundle that verifies an https:// Vault."),
    Setting("PYTHONON_SECRETS_VAULT_NAMESPACE", None, "Vault Enterprise namespace, if any."),
    Setting("PYTHONON_SECRETS_VAULT_TIMEOUT_SECONDS", "5", "Timeout of each request to Vault, in seconds."),
    Setting(
        "PYTHONON_SECRETS_VAULT_RENEW_SECONDS",
        "600",
        "How often a renewable Vault token is renewed, in seconds.",
    ),
    Setting(
        "PYTHONON_SECRETS_USER_MARKERS_DIR",
        None,
        "Directory where the service marks each user who has secrets, for the executor to skip the "
        "call for a user who has none (`pyth-on up`: secret-markers/ in the data directory; unset: "
        "the executor asks for every run).",
        wired=True,
    ),
    Setting("PYTHONON_SECRETS_MAX_VALUE_BYTES", "65536", "Largest secret value accepted, in bytes."),
    Setting(
        "PYTHONON_SECRETS_MAX_PER_USER",
        "100",
        "Most secrets one user may keep (at most 1000, the most names a run may ask for).",
    ),
)

_SEGMENT_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class AppRoleLogin:
    """AppRole credentials, each read from a file (e.g. mounted from a Kubernetes Secret)."""

    role_id_file: Path
    secret_id_file: Path | None
    mount: str


@dataclass(frozen=True)
class VaultSettings:
    """How to reach Vault and who to be there: exactly one of `token_file` and `approle`.

    A token file is re-read whenever Vault refuses the token, so it may be a Vault Agent sink or a
    file that an operator rotates; renewable tokens are renewed every `renew_interval_seconds`."""

    address: str
    token_file: Path | None
    approle: AppRoleLogin | None
    mount: str
    path_prefix: str
    ca_file: Path | None
    namespace: str | None
    timeout_seconds: float
    renew_interval_seconds: int

    @classmethod
    def load(cls, env: Environment) -> VaultSettings:
        address = env.text("PYTHONON_SECRETS_VAULT_ADDR").rstrip("/")
        parsed = urllib.parse.urlsplit(address)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SettingsError(
                "PYTHONON_SECRETS_VAULT_ADDR must be an http:// or https:// URL such as https://vault:8200"
            )
        token_file = _optional_file(env, "PYTHONON_SECRETS_VAULT_TOKEN_FILE")
        role_id_file = _optional_file(env, "PYTHONON_SECRETS_VAULT_ROLE_ID_FILE")
        approle = None
        if role_id_file is not None:
            approle = AppRoleLogin(
                role_id_file=role_id_file,
                secret_id_file=_optional_file(env, "PYTHONON_SECRETS_VAULT_SECRET_ID_FILE"),
                mount=_segment(env, "PYTHONON_SECRETS_VAULT_APPROLE_MOUNT", "approle"),
            )
        elif env.optional("PYTHONON_SECRETS_VAULT_SECRET_ID_FILE"):
            raise SettingsError(
                "PYTHONON_SECRETS_VAULT_SECRET_ID_FILE needs PYTHONON_SECRETS_VAULT_ROLE_ID_FILE as well"
            )
        if (token_file is None) == (approle is None):
            raise SettingsError(
                "set exactly one way to log in to Vault: PYTHONON_SECRETS_VAULT_TOKEN_FILE, or "
                "PYTHONON_SECRETS_VAULT_ROLE_ID_FILE (with PYTHONON_SECRETS_VAULT_SECRET_ID_FILE) for AppRole"
            )
        prefix = env.text("PYTHONON_SECRETS_VAULT_PATH_PREFIX", "pythonon/users").strip("/")
        if not prefix or not all(
            segment and set(segment) <= _SEGMENT_CHARACTERS for segment in prefix.split("/")
        ):
            raise SettingsError(
                "PYTHONON_SECRETS_VAULT_PATH_PREFIX must be a path such as pythonon/users "
                "(letters, digits, '-', '_', '.' and '/')"
            )
        if any(segment in (".", "..") for segment in prefix.split("/")):
            raise SettingsError("PYTHONON_SECRETS_VAULT_PATH_PREFIX must not contain '.' or '..' segments")
        return cls(
            address=address,
            token_file=token_file,
            approle=approle,
            mount=_segment(env, "PYTHONON_SECRETS_VAULT_MOUNT", "secret"),
            path_prefix=prefix,
            ca_file=_optional_file(env, "PYTHONON_SECRETS_VAULT_CA_FILE"),
            namespace=env.optional("PYTHONON_SECRETS_VAULT_NAMESPACE"),
            timeout_seconds=float(env.integer("PYTHONON_SECRETS_VAULT_TIMEOUT_SECONDS", 5, minimum=1)),
            renew_interval_seconds=env.integer("PYTHONON_SECRETS_VAULT_RENEW_SECONDS", 600, minimum=5),
        )


@dataclass(frozen=True)
class SecretsSettings:
    vault: VaultSettings
    audit_address: str
    max_value_bytes: int
    max_secrets_per_user: int
    user_markers_dir: Path | None = None

    @classmethod
    def load(cls, env: Environment) -> SecretsSettings:
        return cls(
            vault=VaultSettings.load(env),
            audit_address=service_address(env, "audit"),
            max_value_bytes=env.integer("PYTHONON_SECRETS_MAX_VALUE_BYTES", 64 * 1024, minimum=1),
            max_secrets_per_user=env.integer(
                "PYTHONON_SECRETS_MAX_PER_USER", 100, minimum=1, maximum=MAX_SECRETS_PER_USER
            ),
            user_markers_dir=env.absolute_path("PYTHONON_SECRETS_USER_MARKERS_DIR"),
        )


def _optional_file(env: Environment, name: str) -> Path | None:
    return env.existing_file(name) if env.optional(name) else None


def _segment(env: Environment, name: str, default: str) -> str:
    value = env.text(name, default).strip("/")
    if not value or not set(value) <= _SEGMENT_CHARACTERS or value in (".", ".."):
        raise SettingsError(f"{name} must be a single path segment such as {default!r}, got {value!r}")
    return value


def load() -> tuple[ServerSettings, SecretsSettings]:
    env = Environment()
    return ServerSettings.load("secrets", env), SecretsSettings.load(env)
