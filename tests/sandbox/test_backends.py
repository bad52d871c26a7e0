"""Choosing a backend, and the clear refusal when the host cannot run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.executor.sandbox import SandboxUnavailable, create_backend, gvisor


def test_an_old_bubblewrap_is_refused_with_the_reason(tmp_path: Path) -> None:
    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho bubblewrap 0.8.0\n")
    old.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match=r"0\.10 or later"):
        create_backend("bwrap", bwrap_path=str(old))


def test_gvisor_without_runsc_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gvisor.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install runsc"):
        create_backend("gvisor")


def test_an_unknown_backend_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="bwrap, gvisor"):
        create_backend("docker")
