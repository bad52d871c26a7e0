"""Sandboxes that run untrusted code: the contract (interface), the bubblewrap backend (bwrap) with
its warm pool, and the gVisor backend (gvisor). No gRPC here: the executor service wraps this."""

from __future__ import annotations

from typing import Any

from services.executor.sandbox.interface import (
    Limits,
    RunResult,
    RunSpec,
    SandboxBackend,
    SandboxBusy,
    SandboxError,
    SandboxUnavailable,
)

BACKENDS = ("bwrap", "gvisor")


def create_backend(name: str = "bwrap", **options: Any) -> SandboxBackend:
    """A backend by name ("bwrap", the default, or "gvisor"); options go to its constructor.
    Raises SandboxUnavailable when it cannot run on this host, with the reason."""
    if name == "bwrap":
        from services.executor.sandbox.bwrap import BwrapBackend

        return BwrapBackend(**options)
    if name == "gvisor":
        from services.executor.sandbox.gvisor import GvisorBackend

        return GvisorBackend(**options)
    raise ValueError(f"unknown sandbox backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "Limits",
    "RunResult",
    "RunSpec",
    "SandboxBackend",
    "SandboxBusy",
    "SandboxError",
    "SandboxUnavailable",
    "create_backend",
]
