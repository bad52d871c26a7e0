"""What only the bwrap backend does (the contract suite covers what every backend does): its host
uid per sandbox, its seccomp filter, its bubblewrap version check, and a warm start cheaper than a
bare interpreter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.executor.sandbox import RunSpec, SandboxUnavailable, create_backend
from services.executor.sandbox.bwrap import DEFAULT_UID_BASE
from tests.sandbox.conftest import Sandbox, bwrap_factory


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with bwrap_factory() as started:
        yield started


def test_an_old_bubblewrap_is_refused_with_the_reason(tmp_path: Path) -> None:
    old = tmp_path / "bwrap"
    old.write_text("#!/bin/sh\necho bubblewrap 0.8.0\n")
    old.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match=r"0\.10 or later"):
        create_backend("bwrap", bwrap_path=str(old))


def test_each_sandbox_has_a_host_uid_of_its_own_and_no_new_privileges(sandbox: Sandbox) -> None:
    code = """
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
import os
print(os.getuid(), status["NoNewPrivs"].strip(), *open("/proc/self/uid_map").read().split())
"""
    first = sandbox.python(code).stdout.split()
    second = sandbox.python(code).stdout.split()
    assert first[1] == "1"
    if os.geteuid() == 0:
        # No user namespace: the uid inside is the uid on the host, so it is not root there either.
        assert first[2:] == ["0", "0", "4294967295"] and int(first[0]) >= DEFAULT_UID_BASE
        assert first[0] != second[0]


def test_the_seccomp_filter_refuses_user_namespaces(sandbox: Sandbox) -> None:
    if not sandbox.backend.enforced_limits().get("seccomp"):
        pytest.skip("no seccomp filter on this architecture")
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print(libc.unshare(0x10000000), ctypes.get_errno(), libc.unshare(0x00020000), ctypes.get_errno())
"""
    result = sandbox.python(code)
    assert result.stdout.split() == ["-1", "1", "-1", "1"], result.stderr  # EPERM


def test_a_run_with_a_package_environment_leaves_a_warm_pool_for_its_next_runs(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """One user's runs with packages come back to back: their profile is kept warm, as deep as a
    language's pool, so that the next runs find a started sandbox."""
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "tiny_env.py").write_text("NAME = 'mounted'\n")
    environment.chmod(0o755)
    (environment / "tiny_env.py").chmod(0o644)
    spec = RunSpec(
        "python",
        "import tiny_env\nprint(tiny_env.NAME)",
        env={"PYTHONPATH": "/opt/pythonon/packages"},
        readonly_paths=((str(environment), "/opt/pythonon/packages"),),
    )
    assert sandbox.run(spec).stdout == "mounted\n"
    backend: Any = sandbox.backend
    profile = backend._profile("python", spec.limits, spec.readonly_paths)
    depth = backend.options.pool_size
    assert backend._pool.size_of(profile) == depth
    sandbox.loop.call(backend._pool.fill(depth))
    assert backend._pool.ready(profile) == depth
    for _ in range(depth):  # each of these takes a warm sandbox
        assert sandbox.run(spec).stdout == "mounted\n"
