"""The packages service's settings, read once at start-up."""

from __future__ import annotations

import os
import shutil
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    database_url,
    service_address,
    wiring_settings,
)

MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("packages"),
    Setting(
        "PYTHONON_PACKAGES_DIR",
        None,
        "Directory of the package environments (content-addressed, read-only once built) and of the "
        "users' markers; the executor reads it too (`pyth-on up`: packages/ in the data directory).",
        wired=True,
    ),
    Setting(
        "PYTHONON_PACKAGES_INDEX_URL",
        None,
        "Simple-API index the packages are installed from (unset: the installer's default, the public index).",
    ),
    Setting(
        "PYTHONON_PACKAGES_PYTHON",
        None,
        "Interpreter the environments are built for: the sandbox's (unset: the base interpreter of the "
        "service's own Python, which is what the executor's sandbox runs by default).",
    ),
    Setting(
        "PYTHONON_PACKAGES_UV", None, "The uv executable (unset: the one installed next to the service)."
    ),
    Setting("PYTHONON_PACKAGES_MAX_ENVIRONMENT_MIB", "1024", "Largest environment a build may make, in MiB."),
    Setting("PYTHONON_PACKAGES_MAX_BUILD_SECONDS", "300", "Longest a build may take, in seconds."),
    Setting("PYTHONON_PACKAGES_MAX_CONCURRENT_BUILDS", "2", "Builds run at once; others wait their turn."),
    Setting(
        "PYTHONON_PACKAGES_SOURCE_BUILDS",
        "false",
        "`true`: a package that ships only a source distribution is built into a wheel inside a bwrap "
        "sandbox (no network, the limits below, the build's time limit); `false`: such a package fails "
        "with that reason. Nothing of a package ever runs on the host either way.",
    ),
    Setting("PYTHONON_PACKAGES_SOURCE_BUILD_MEMORY_MIB", "1024", "Memory of one build from source, in MiB."),
    Setting(
        "PYTHONON_PACKAGES_SOURCE_BUILD_DISK_MIB",
        "512",
        "Disk of one build from source (its working directory and /tmp, each; the wheel's size), in MiB.",
    ),
)


@dataclass(frozen=True)
class PackagesSettings:
    database_url: str
    audit_address: str
    store: Path
    index_url: str | None
    python: str
    uv: str
    max_environment_bytes: int
    max_build_seconds: float
    max_concurrent_builds: int
    source_builds: bool
    source_build_memory_bytes: int
    source_build_disk_bytes: int

    @classmethod
    def load(cls, env: Environment) -> PackagesSettings:
        store = Path(env.text("PYTHONON_PACKAGES_DIR"))
        if not store.is_absolute():
            raise SettingsError("PYTHONON_PACKAGES_DIR must be an absolute path")
        index_url = env.optional("PYTHONON_PACKAGES_INDEX_URL")
        if index_url is not None:
            parsed = urllib.parse.urlsplit(index_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise SettingsError("PYTHONON_PACKAGES_INDEX_URL must be an http:// or https:// URL")
        python = env.optional("PYTHONON_PACKAGES_PYTHON") or _base_interpreter()
        if not os.access(python, os.X_OK):
            raise SettingsError(f"PYTHONON_PACKAGES_PYTHON: {python} is not an executable")
        uv = env.optional("PYTHONON_PACKAGES_UV") or _bundled_uv()
        if uv is None or not os.access(uv, os.X_OK):
            raise SettingsError("uv is not installed next to the service; set PYTHONON_PACKAGES_UV")
        return cls(
            database_url=database_url(env, "packages"),
            audit_address=service_address(env, "audit"),
            store=store,
            index_url=index_url,
            python=python,
            uv=uv,
            max_environment_bytes=env.integer("PYTHONON_PACKAGES_MAX_ENVIRONMENT_MIB", 1024, minimum=1) * MiB,
            max_build_seconds=float(env.integer("PYTHONON_PACKAGES_MAX_BUILD_SECONDS", 300, minimum=1)),
            max_concurrent_builds=env.integer("PYTHONON_PACKAGES_MAX_CONCURRENT_BUILDS", 2, minimum=1),
            source_builds=_switch(env, "PYTHONON_PACKAGES_SOURCE_BUILDS"),
            source_build_memory_bytes=env.integer(
                "PYTHONON_PACKAGES_SOURCE_BUILD_MEMORY_MIB", 1024, minimum=64
            )
            * MiB,
            source_build_disk_bytes=env.integer("PYTHONON_PACKAGES_SOURCE_BUILD_DISK_MIB", 512, minimum=16)
            * MiB,
        )


def _switch(env: Environment, name: str) -> bool:
    value = env.text(name, "false").strip().lower()
    if value not in ("true", "false"):
        raise SettingsError(f"{name} must be true or false, got {value!r}")
    return value == "true"


def _base_interpreter() -> str:
    """What the executor's sandbox runs by default (services/executor/sandbox/runtimes.find_python)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(sys.base_prefix, "bin", version)


def _bundled_uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.exists() else shutil.which("uv")


def load() -> tuple[ServerSettings, PackagesSettings]:
    env = Environment()
    return ServerSettings.load("packages", env), PackagesSettings.load(env)
