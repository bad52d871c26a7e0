"""The audit service's settings, read once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    database_url,
    wiring_settings,
)

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("audit"),
    Setting(
        "PYTHONON_AUDIT_PAGE_SIZE", "50", "Entries per page of the audit list when the caller names no limit."
    ),
    Setting(
        "PYTHONON_AUDIT_MAX_PAGE_SIZE",
        "500",
        "The most entries a caller may ask for in one page (at least PYTHONON_AUDIT_PAGE_SIZE).",
    ),
)


@dataclass(frozen=True)
class AuditSettings:
    database_url: str
    # Entries per page of ListEntries when the caller names no limit, and the most a caller may ask for.
    page_size: int = 50
    max_page_size: int = 500

    @classmethod
    def load(cls, env: Environment) -> AuditSettings:
        page_size = env.integer("PYTHONON_AUDIT_PAGE_SIZE", 50, minimum=1)
        max_page_size = env.integer("PYTHONON_AUDIT_MAX_PAGE_SIZE", 500, minimum=1)
        if page_size > max_page_size:
            raise SettingsError(
                f"PYTHONON_AUDIT_PAGE_SIZE ({page_size}) must not exceed "
                f"PYTHONON_AUDIT_MAX_PAGE_SIZE ({max_page_size})"
            )
        return cls(database_url=database_url(env, "audit"), page_size=page_size, max_page_size=max_page_size)


def load() -> tuple[ServerSettings, AuditSettings]:
    env = Environment()
    return ServerSettings.load("audit", env), AuditSettings.load(env)
