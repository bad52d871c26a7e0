"""Every documented PYTHONON_* variable, from the `SETTINGS` table of each built service's settings
module and the common ones of the platform: what the runner passes through to each service, what it
refuses, and what tools/settings_reference.py writes to docs/settings.md."""

from __future__ import annotations

import importlib

from services.platform import service_graph
from services.platform.settings import COMMON_SETTINGS, Setting

COMMON = "common"


def service_settings(service: str) -> tuple[Setting, ...]:
    """The table of `services/<service>/settings.py`."""
    module = importlib.import_module(f"services.{service_graph.service(service).name}.settings")
    table: tuple[Setting, ...] = module.SETTINGS
    return table


def catalog() -> dict[str, tuple[Setting, ...]]:
    """The common settings (read by every service) first, then each built service in the graph's order."""
    return {
        COMMON: COMMON_SETTINGS,
        **{node.name: service_settings(node.name) for node in service_graph.built_services()},
    }


def service_prefix(service: str) -> str:
    """The prefix of a service's own variables, e.g. PYTHONON_AUTH_."""
    return f"PYTHONON_{service.upper()}_"
