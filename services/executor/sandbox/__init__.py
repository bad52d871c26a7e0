"""Sandboxes that run untrusted code: the contract (interface), the language table (languages), the
parts every host backend shares (host_backend, warm_pool, admission), and the backends: bubblewrap
(bwrap) and gVisor (gvisor), and pods in a cluster (kubernetes, with its own small endpoint for the
pods' runners: kubernetes_endpoint). Otherwise no gRPC here: the executor service wraps this."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from services.executor.sandbox import leftovers
from services.executor.sandbox.host_backend import BackendOptionError, BackendOptions, HostBackend
from services.executor.sandbox.interface import (
    Limits,
    RunResult,
    RunSpec,
    SandboxBackend,
    SandboxBusy,
    SandboxError,
    SandboxUnavailable,
)
from services.executor.sandbox.languages import LANGUAGES

if TYPE_CHECKING:
    from services.executor.sandbox.kubernetes import KubernetesBackend

BACKENDS = ("bwrap", "gvisor", "kubernetes")


def backend_class(name: str) -> type[HostBackend[Any, Any]] | type[KubernetesBackend]:
    """The backend class by name; ValueError for an unknown one."""
    if name == "bwrap":
        from services.executor.sandbox.bwrap import BwrapBackend

        return BwrapBackend
    if name == "gvisor":
        from services.executor.sandbox.gvisor import GvisorBackend

        return GvisorBackend
    if name == "kubernetes":
        from services.executor.sandbox.kubernetes import KubernetesBackend

        return KubernetesBackend
    raise ValueError(f"unknown sandbox backend {name!r}; choose one of {', '.join(BACKENDS)}")


def backend_options(name: str, options: Mapping[str, Any]) -> BackendOptions:
    """The options of backend `name`, validated: BackendOptionError names an unknown option or a bad
    value (checked without starting anything, e.g. while the executor reads its settings)."""
    cls = backend_class(name)
    return cls.options_type.parse(name, options)


def reap_leftovers(name: str, options: Mapping[str, Any]) -> leftovers.Reaped:
    """Kill and remove what executors that are gone (e.g. SIGKILLed) left on this host: their
    sandboxes' processes, runtime directories and cgroups, never another live executor's. Run at
    start-up, before a backend of `name` with `options` claims anything."""
    if name == "bwrap" and os.geteuid() == 0:
        from services.executor.sandbox import bwrap

        return leftovers.reap(
            uid_base=int(options.get("uid_base", bwrap.DEFAULT_UID_BASE)),
            uid_block=bwrap.UID_BLOCK,
            uid_locks=bwrap.uid_lock_dir(),
        )
    return leftovers.reap()


def create_backend(name: str = "bwrap", **options: Any) -> SandboxBackend:
    """A backend by name ("bwrap", the default, or "gvisor") with validated options. Raises
    BackendOptionError for an unknown option or a bad value, and SandboxUnavailable when the backend
    cannot run on this host, with the reason."""
    cls = backend_class(name)
    return cls(cls.options_type.parse(name, options))


__all__ = [
    "BACKENDS",
    "LANGUAGES",
    "BackendOptionError",
    "Limits",
    "RunResult",
    "RunSpec",
    "SandboxBackend",
    "SandboxBusy",
    "SandboxError",
    "SandboxUnavailable",
    "backend_class",
    "backend_options",
    "create_backend",
    "reap_leftovers",
]
