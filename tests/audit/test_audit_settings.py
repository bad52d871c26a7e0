"""The audit service's settings: defaults, overrides, and refusals at start-up."""

from __future__ import annotations

import pytest

from services.audit.settings import AuditSettings
from services.platform.settings import Environment, SettingsError


def test_defaults_and_the_shared_database_url() -> None:
    settings = AuditSettings.load(Environment({"PYTHONON_DATABASE_URL": "sqlite:////data/pythonon.db"}))
    assert settings == AuditSettings(
        database_url="sqlite:////data/pythonon.db", page_size=50, max_page_size=500
    )


def test_the_audit_database_url_and_page_sizes_can_be_set() -> None:
    env = Environment(
        {
            "PYTHONON_DATABASE_URL": "sqlite:////data/pythonon.db",
            "PYTHONON_AUDIT_DATABASE_URL": "postgresql://audit@db/audit",
            "PYTHONON_AUDIT_PAGE_SIZE": "20",
            "PYTHONON_AUDIT_MAX_PAGE_SIZE": "100",
        }
    )
    assert AuditSettings.load(env) == AuditSettings(
        database_url="postgresql://audit@db/audit", page_size=20, max_page_size=100
    )


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({}, "PYTHONON_AUDIT_DATABASE_URL (or PYTHONON_DATABASE_URL) is required"),
        ({"PYTHONON_AUDIT_DATABASE_URL": "mysql://db/audit"}, "must be a sqlite:// or postgresql:// URL"),
        ({"PYTHONON_AUDIT_PAGE_SIZE": "0"}, "PYTHONON_AUDIT_PAGE_SIZE must be at least 1"),
        ({"PYTHONON_AUDIT_PAGE_SIZE": "many"}, "PYTHONON_AUDIT_PAGE_SIZE must be an integer"),
        ({"PYTHONON_AUDIT_MAX_PAGE_SIZE": "0"}, "PYTHONON_AUDIT_MAX_PAGE_SIZE must be at least 1"),
        (
            {"PYTHONON_AUDIT_PAGE_SIZE": "60", "PYTHONON_AUDIT_MAX_PAGE_SIZE": "50"},
            "PYTHONON_AUDIT_PAGE_SIZE (60) must not exceed PYTHONON_AUDIT_MAX_PAGE_SIZE (50)",
        ),
    ],
)
def test_bad_settings_are_refused_clearly(env: dict[str, str], complaint: str) -> None:
    base = {} if "PYTHONON_AUDIT_DATABASE_URL" in env or not env else {"PYTHONON_DATABASE_URL": "sqlite://"}
    with pytest.raises(SettingsError) as refused:
        AuditSettings.load(Environment({**base, **env}))
    assert complaint in str(refused.value)
