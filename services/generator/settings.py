"""The generator's settings, read once at start-up.

Besides its own PYTHONON_GENERATOR_* variables it reads the Anthropic SDK's standard ones, which the
runner passes through from the operator's environment (the graph's outside variables):
ANTHROPIC_API_KEY (unset: the generator starts unconfigured and answers 503) and ANTHROPIC_BASE_URL
(unset: the SDK's default endpoint). They are read here and handed to the SDK explicitly, so the SDK
consults no other source of credentials (profiles, files)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    service_address,
    wiring_settings,
)

API_KEY_VARIABLE = "ANTHROPIC_API_KEY"
BASE_URL_VARIABLE = "ANTHROPIC_BASE_URL"
DEFAULT_MODEL = "claude-sonnet-5-5"

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("generator"),
    Setting(
        "PYTHONON_GENERATOR_MODEL",
        DEFAULT_MODEL,
        "The Claude model that writes the code (ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL, the SDK's "
        "own variables, configure the client; without a key generate answers 503).",
    ),
    Setting("PYTHONON_GENERATOR_MAX_TOKENS", "8192", "Most tokens the model may write in one answer."),
    Setting(
        "PYTHONON_GENERATOR_TIMEOUT_SECONDS",
        "45",
        "How long the model may take to answer, its retries included, before generate answers 504.",
    ),
    Setting(
        "PYTHONON_GENERATOR_MAX_RETRIES",
        "2",
        "Retries of a model call the API answered with 5xx or overloaded (529), or that lost its "
        "connection (the SDK's back-off). A 429 is not retried: it is passed on with its Retry-After.",
    ),
)


@dataclass(frozen=True)
class GeneratorSettings:
    """`api_key` None: not configured (the service runs, generate answers 503)."""

    api_key: str | None
    base_url: str | None
    model: str
    max_tokens: int
    timeout_seconds: float
    max_retries: int
    executor_address: str
    secrets_address: str
    audit_address: str
    packages_address: str

    def __repr__(self) -> str:
        # The key never reaches a log line, not even through a repr of the settings.
        return f"GeneratorSettings(model={self.model!r}, configured={self.api_key is not None})"

    @classmethod
    def load(cls, env: Environment) -> GeneratorSettings:
        api_key = (env.optional(API_KEY_VARIABLE) or "").strip() or None
        base_url = env.optional(BASE_URL_VARIABLE)
        if base_url is not None:
            parsed = urllib.parse.urlsplit(base_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise SettingsError(f"{BASE_URL_VARIABLE} must be an http:// or https:// URL")
        model = env.text("PYTHONON_GENERATOR_MODEL", DEFAULT_MODEL).strip()
        if not model or any(character.isspace() for character in model):
            raise SettingsError("PYTHONON_GENERATOR_MODEL must be a model name such as " + DEFAULT_MODEL)
        return cls(
            api_key=api_key,
            base_url=base_url,
            model=model,
            max_tokens=env.integer("PYTHONON_GENERATOR_MAX_TOKENS", 8192, minimum=256),
            timeout_seconds=float(env.integer("PYTHONON_GENERATOR_TIMEOUT_SECONDS", 45, minimum=1)),
            max_retries=env.integer("PYTHONON_GENERATOR_MAX_RETRIES", 2),
            executor_address=service_address(env, "executor"),
            secrets_address=service_address(env, "secrets"),
            audit_address=service_address(env, "audit"),
            packages_address=service_address(env, "packages"),
        )


def load() -> tuple[ServerSettings, GeneratorSettings]:
    env = Environment()
    return ServerSettings.load("generator", env), GeneratorSettings.load(env)
