"""The auth service's settings, read once at start-up."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    database_url,
    service_address,
    wiring_settings,
)

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("auth"),
    Setting(
        "PYTHONON_AUTH_IDENTITY_KEY_FILE",
        None,
        "PEM Ed25519 private key that signs the identity assertions the edge forwards to services.",
        wired=True,
    ),
    Setting(
        "PYTHONON_AUTH_ACCESS_TOKEN_KEY_FILE",
        None,
        "PEM Ed25519 private key that signs users' access JWTs.",
        wired=True,
    ),
    Setting(
        "PYTHONON_AUTH_SECRET_KEY_FILE",
        None,
        "At least 32 random bytes, base64: the key of API-key digests and of encrypted fields.",
        wired=True,
    ),
    Setting("PYTHONON_AUTH_ACCESS_TOKEN_TTL_SECONDS", "900", "Lifetime of an access JWT, in seconds."),
    Setting(
        "PYTHONON_AUTH_REFRESH_TOKEN_TTL_SECONDS",
        "2592000",
        "Lifetime of a refresh token, in seconds (30 days).",
    ),
    Setting("PYTHONON_AUTH_USER_RATE_BURST", "200", "Requests a user may make at once (token bucket size)."),
    Setting(
        "PYTHONON_AUTH_USER_RATE_PER_MINUTE", "3000", "Rate at which a user's bucket refills, per minute."
    ),
    Setting(
        "PYTHONON_AUTH_CLIENT_IP_RATE_BURST",
        "20",
        "Calls one client address may make at once to each route limited by address (register, login, refresh).",
    ),
    Setting(
        "PYTHONON_AUTH_CLIENT_IP_RATE_PER_MINUTE",
        "20",
        "Rate at which a client address's bucket refills, per minute.",
    ),
    Setting(
        "PYTHONON_AUTH_API_KEY_CACHE_SECONDS",
        "30",
        "How long the edge check remembers which user an API key names (0: not at all).",
    ),
)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `burst` requests at once, refilled at `per_minute` a minute."""

    burst: int
    per_minute: int


@dataclass(frozen=True)
class AuthSettings:
    database_url: str
    audit_address: str
    identity_private_key: bytes
    access_token_private_key: bytes
    secret_key: bytes
    access_token_ttl_seconds: int
    refresh_token_ttl_seconds: int
    user_rate_limit: RateLimit
    client_ip_rate_limit: RateLimit
    # How long the edge check remembers which user an API key names (0: not at all).
    api_key_cache_seconds: int = 30

    @classmethod
    def load(cls, env: Environment) -> AuthSettings:
        secret_file = env.existing_file("PYTHONON_AUTH_SECRET_KEY_FILE")
        try:
            secret = base64.b64decode(secret_file.read_bytes().strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError("PYTHONON_AUTH_SECRET_KEY_FILE must hold base64 bytes") from None
        if len(secret) < 32:
            raise SettingsError("PYTHONON_AUTH_SECRET_KEY_FILE must hold at least 32 random bytes")
        return cls(
            database_url=database_url(env, "auth"),
            audit_address=service_address(env, "audit"),
            identity_private_key=env.existing_file("PYTHONON_AUTH_IDENTITY_KEY_FILE").read_bytes(),
            access_token_private_key=env.existing_file("PYTHONON_AUTH_ACCESS_TOKEN_KEY_FILE").read_bytes(),
            secret_key=secret,
            access_token_ttl_seconds=env.integer("PYTHONON_AUTH_ACCESS_TOKEN_TTL_SECONDS", 900, minimum=1),
            refresh_token_ttl_seconds=env.integer(
                "PYTHONON_AUTH_REFRESH_TOKEN_TTL_SECONDS", 30 * 24 * 3600, minimum=1
            ),
            user_rate_limit=RateLimit(
                burst=env.integer("PYTHONON_AUTH_USER_RATE_BURST", 200, minimum=1),
                per_minute=env.integer("PYTHONON_AUTH_USER_RATE_PER_MINUTE", 3000, minimum=1),
            ),
            client_ip_rate_limit=RateLimit(
                burst=env.integer("PYTHONON_AUTH_CLIENT_IP_RATE_BURST", 20, minimum=1),
                per_minute=env.integer("PYTHONON_AUTH_CLIENT_IP_RATE_PER_MINUTE", 20, minimum=1),
            ),
            api_key_cache_seconds=env.integer("PYTHONON_AUTH_API_KEY_CACHE_SECONDS", 30, minimum=0),
        )


def load() -> tuple[ServerSettings, AuthSettings]:
    env = Environment()
    return ServerSettings.load("auth", env), AuthSettings.load(env)
