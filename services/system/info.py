"""Facts about this deployment that GET /api/info reports."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass

from services.platform.service_graph import SECTIONS

PRODUCT_NAME = "Pyth-On"
MIB = 1024 * 1024
KIB = 1024


def package_version() -> str:
    """The installed version of the pyth-on distribution."""
    try:
        return importlib.metadata.version("pyth-on")
    except importlib.metadata.PackageNotFoundError:
        # Running from a tree that was never installed; say so rather than invent a number.
        return "0+unknown"


@dataclass(frozen=True)
class RunLimits:
    """The limits a run gets by default (DESIGN.md §6)."""

    timeout_default_seconds: float = 10.0
    timeout_max_seconds: float = 60.0
    memory_mib: int = 256
    processes: int = 64
    output_bytes: int = 1 * MIB
    file_bytes: int = 16 * MIB
    tmp_bytes: int = 64 * MIB
    code_bytes: int = 256 * KIB
    network: bool = False


@dataclass(frozen=True)
class DeploymentInfo:
    """What the system service knows itself; languages, the sandbox and the enforced limits are the
    executor's to report, and the servicer asks it for them."""

    name: str
    version: str
    limits: RunLimits
    features: Mapping[str, bool]


def deployment_info(
    built_sections: set[str], version: str, limits: RunLimits | None = None
) -> DeploymentInfo:
    """What this deployment offers: its name, version, run limits and which sections are built."""
    return DeploymentInfo(
        name=PRODUCT_NAME,
        version=version,
        limits=limits or RunLimits(),
        features={section: section in built_sections for section in SECTIONS},
    )
