"""The executor's settings, read once at start-up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.executor.sandbox import BACKENDS, BackendOptionError, Limits, backend_options
from services.platform.settings import (
    Environment,
    ServerSettings,
    Setting,
    SettingsError,
    service_address,
    wiring_settings,
)

MiB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    *wiring_settings("executor"),
    Setting(
        "PYTHONON_EXECUTOR_BACKEND",
        "bwrap",
        f"Sandbox backend: {', '.join(BACKENDS)}. `pyth-on up --sandbox` sets it; its default is this variable.",
    ),
    Setting(
        "PYTHONON_EXECUTOR_BACKEND_OPTIONS",
        None,
        'JSON object of backend options, e.g. {"platform": "ptrace"} for gvisor; unknown options are refused.',
    ),
    Setting(
        "PYTHONON_EXECUTOR_TIMEOUT_SECONDS", "10", "Wall-clock limit of a run that names none, in seconds."
    ),
    Setting(
        "PYTHONON_EXECUTOR_MAX_TIMEOUT_SECONDS", "60", "The longest timeout a caller may ask for, in seconds."
    ),
    Setting("PYTHONON_EXECUTOR_MEMORY_MIB", "256", "Memory limit of a run, in MiB (at least 16)."),
    Setting("PYTHONON_EXECUTOR_PROCESSES", "64", "Most processes a run may have at once."),
    Setting(
        "PYTHONON_EXECUTOR_OUTPUT_BYTES", "1048576", "Most bytes of stdout and of stderr kept from a run."
    ),
    Setting("PYTHONON_EXECUTOR_FILE_MIB", "16", "Largest file a run may write, in MiB."),
    Setting("PYTHONON_EXECUTOR_TMP_MIB", "64", "Size of a run's /tmp, in MiB."),
    Setting(
        "PYTHONON_EXECUTOR_POOL_SIZE",
        "4",
        "Warm sandboxes kept started per language, waiting for a run (0: none).",
    ),
    Setting(
        "PYTHONON_EXECUTOR_MAX_CONCURRENT",
        "0",
        "Most runs at once (0: sized at start-up as min(available memory / PYTHONON_EXECUTOR_MEMORY_MIB, "
        "available cores × PYTHONON_EXECUTOR_RUNS_PER_CORE / a run's CPU quota of one core), where "
        "available means the host's, bounded by the executor's cgroup limits).",
    ),
    Setting(
        "PYTHONON_EXECUTOR_RUNS_PER_CORE",
        "4",
        "Runs that share a core when PYTHONON_EXECUTOR_MAX_CONCURRENT is 0: a sleeping or waiting run "
        "uses no core, and the CPU quota keeps a busy one to its share.",
    ),
    Setting(
        "PYTHONON_EXECUTOR_REPLICAS_ON_HOST",
        "1",
        "Executors sharing this host (`pyth-on up --executors N` sets it): when "
        "PYTHONON_EXECUTOR_MAX_CONCURRENT is 0, each sizes its runs at once for its share of the "
        "available memory and cores (bwrap and gvisor backends).",
    ),
    Setting(
        "PYTHONON_EXECUTOR_MAX_RUNS_PER_USER",
        "0",
        "Most runs of one user at once while other users want slots (0: half of the runs at once, "
        "rounded up); a user's further runs wait in line, served round-robin with other users'. Slots "
        "nobody else wants are lent beyond it, all but one, which stays free for a newcomer.",
    ),
    Setting(
        "PYTHONON_EXECUTOR_MAX_QUEUE_SECONDS",
        "30",
        "Longest expected wait in line for a run slot, in seconds; a run whose expected wait is longer "
        "is refused with 429 and that wait as Retry-After (0: refuse rather than wait).",
    ),
    Setting(
        "PYTHONON_EXECUTOR_MAX_WAITING_PER_USER",
        "100",
        "Most runs of one user waiting in line; further ones are refused with 429 (bounds the memory "
        "held by queued requests).",
    ),
    Setting(
        "PYTHONON_EXECUTOR_PACKAGES_DIR",
        None,
        "The package environments' directory the packages service builds into, read-only here "
        "(`pyth-on up`: packages/ in the data directory; unset: runs get no packages).",
        wired=True,
    ),
    Setting(
        "PYTHONON_EXECUTOR_SECRETS_MARKERS_DIR",
        None,
        "The secrets service's user markers (PYTHONON_SECRETS_USER_MARKERS_DIR), read here: a run of "
        "a user without secrets then needs no call (`pyth-on up`: secret-markers/ in the data "
        "directory; unset: every run asks the secrets service).",
        wired=True,
    ),
    Setting(
        "PYTHONON_EXECUTOR_PACKAGES_WAIT_SECONDS",
        "20",
        "How long a run waits for its user's package environment being built before it is refused "
        "(FAILED_PRECONDITION, with the build's progress).",
    ),
    Setting("PYTHONON_EXECUTOR_MAX_CODE_BYTES", "262144", "Largest code accepted, in bytes."),
    Setting("PYTHONON_EXECUTOR_MAX_STDIN_BYTES", "1048576", "Largest stdin accepted, in bytes."),
)


@dataclass(frozen=True)
class ExecutorSettings:
    backend: str
    # Validated by the backend's options type; from the settings below and PYTHONON_EXECUTOR_BACKEND_OPTIONS.
    backend_options: Mapping[str, Any]
    default_limits: Limits
    max_timeout_seconds: float
    max_code_bytes: int
    max_stdin_bytes: int
    secrets_address: str
    audit_address: str
    packages_address: str | None = None
    packages_dir: Path | None = None
    packages_wait_seconds: float = 20.0
    secrets_markers_dir: Path | None = None

    @classmethod
    def load(cls, env: Environment) -> ExecutorSettings:
        backend = env.text("PYTHONON_EXECUTOR_BACKEND", "bwrap")
        if backend not in BACKENDS:
            raise SettingsError(
                f"PYTHONON_EXECUTOR_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        default_timeout = env.integer("PYTHONON_EXECUTOR_TIMEOUT_SECONDS", 10, minimum=1)
        max_timeout = env.integer("PYTHONON_EXECUTOR_MAX_TIMEOUT_SECONDS", 60, minimum=1)
        if default_timeout > max_timeout:
            raise SettingsError(
                "PYTHONON_EXECUTOR_TIMEOUT_SECONDS must not exceed PYTHONON_EXECUTOR_MAX_TIMEOUT_SECONDS"
            )
        max_concurrent = env.integer("PYTHONON_EXECUTOR_MAX_CONCURRENT", 0)
        max_runs_per_user = env.integer("PYTHONON_EXECUTOR_MAX_RUNS_PER_USER", 0)
        replicas_on_host = env.integer("PYTHONON_EXECUTOR_REPLICAS_ON_HOST", 1, minimum=1)
        default_limits = Limits(
            timeout_seconds=float(default_timeout),
            memory_bytes=env.integer("PYTHONON_EXECUTOR_MEMORY_MIB", 256, minimum=16) * MiB,
            processes=env.integer("PYTHONON_EXECUTOR_PROCESSES", 64, minimum=1),
            output_bytes=env.integer("PYTHONON_EXECUTOR_OUTPUT_BYTES", 1 * MiB, minimum=1024),
            file_bytes=env.integer("PYTHONON_EXECUTOR_FILE_MIB", 16, minimum=1) * MiB,
            tmp_bytes=env.integer("PYTHONON_EXECUTOR_TMP_MIB", 64, minimum=1) * MiB,
        )
        options: dict[str, Any] = {
            "pool_size": env.integer("PYTHONON_EXECUTOR_POOL_SIZE", 4),
            "max_concurrent": max_concurrent or None,
            "runs_per_core": float(env.integer("PYTHONON_EXECUTOR_RUNS_PER_CORE", 4, minimum=1)),
            "max_runs_per_user": max_runs_per_user or None,
            **({"host_sharers": replicas_on_host} if replicas_on_host > 1 else {}),
            "max_queue_seconds": float(env.integer("PYTHONON_EXECUTOR_MAX_QUEUE_SECONDS", 30)),
            "max_waiting_per_user": env.integer("PYTHONON_EXECUTOR_MAX_WAITING_PER_USER", 100),
            "max_timeout_seconds": float(max_timeout),
            "default_limits": default_limits,
            **_extra_backend_options(env),
        }
        try:
            backend_options(backend, options)
        except BackendOptionError as error:
            raise SettingsError(f"the {backend} sandbox backend refuses its options: {error}") from None
        return cls(
            backend=backend,
            backend_options=options,
            default_limits=default_limits,
            max_timeout_seconds=float(max_timeout),
            max_code_bytes=env.integer("PYTHONON_EXECUTOR_MAX_CODE_BYTES", 256 * 1024, minimum=1),
            max_stdin_bytes=env.integer("PYTHONON_EXECUTOR_MAX_STDIN_BYTES", 1 * MiB, minimum=0),
            secrets_address=service_address(env, "secrets"),
            audit_address=service_address(env, "audit"),
            secrets_markers_dir=env.absolute_path("PYTHONON_EXECUTOR_SECRETS_MARKERS_DIR"),
            **_packages(env),
        )


def _packages(env: Environment) -> dict[str, Any]:
    """Where the package environments are and how long a run waits for one (no directory: no packages)."""
    directory = env.absolute_path("PYTHONON_EXECUTOR_PACKAGES_DIR")
    wait = float(env.integer("PYTHONON_EXECUTOR_PACKAGES_WAIT_SECONDS", 20))
    if directory is None:
        return {"packages_wait_seconds": wait}
    return {
        "packages_address": service_address(env, "packages"),
        "packages_dir": directory,
        "packages_wait_seconds": wait,
    }


def _extra_backend_options(env: Environment) -> dict[str, Any]:
    """PYTHONON_EXECUTOR_BACKEND_OPTIONS: a JSON object of backend options, e.g.
    {"platform": "ptrace"} for gvisor or {"seccomp_filter": true} for bwrap."""
    raw = env.optional("PYTHONON_EXECUTOR_BACKEND_OPTIONS")
    if raw is None:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as error:
        raise SettingsError(f"PYTHONON_EXECUTOR_BACKEND_OPTIONS is not JSON: {error}") from None
    if not isinstance(options, dict):
        raise SettingsError(
            "PYTHONON_EXECUTOR_BACKEND_OPTIONS must be a JSON object of option names to values"
        )
    if "default_limits" in options:
        raise SettingsError(
            "PYTHONON_EXECUTOR_BACKEND_OPTIONS cannot set default_limits: use PYTHONON_EXECUTOR_* limits"
        )
    return options


def load() -> tuple[ServerSettings, ExecutorSettings]:
    env = Environment()
    return ServerSettings.load("executor", env), ExecutorSettings.load(env)
