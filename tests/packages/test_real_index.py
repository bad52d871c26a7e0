"""One build against the real public index (the default when PYTHONON_PACKAGES_INDEX_URL is unset):
resolved to a lock with hashes, installed from wheels with bytecode, read-only. Skipped, saying so,
when this machine cannot reach the index."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from services.packages.environments import BuildFailed, BuildLimits, EnvironmentStore, Installer, Target
from services.packages.settings import _base_interpreter


def test_a_real_package_builds_from_the_public_index(tmp_path: Path) -> None:
    store = EnvironmentStore(tmp_path / "store")
    installer = Installer(uv=str(Path(sys.executable).parent / "uv"), index_url=None, cache_dir=store.cache)
    target = Target.probe(_base_interpreter())

    async def build() -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        try:
            lock = await installer.resolve(["humanize>=4"], target, deadline)
        except BuildFailed as failure:
            if any(
                word in str(failure).lower() for word in ("connect", "dns", "network", "fetch", "timed out")
            ):
                pytest.skip(f"the public package index is not reachable: {failure}")
            raise
        assert set(lock.versions) == {"humanize"} and "--hash=sha256:" in lock.text
        return await store.build(
            installer, lock, target, BuildLimits(1 << 30, 120), deadline, lambda _n: None
        )

    key = asyncio.run(build())
    site = store.path(key)
    assert (site / "humanize" / "__init__.py").is_file()
    assert list((site / "humanize" / "__pycache__").glob("__init__.cpython-*.pyc"))
    mode = os.stat(site / "humanize" / "__init__.py").st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and mode & stat.S_IROTH
