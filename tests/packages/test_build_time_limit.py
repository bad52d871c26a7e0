"""A build past its time limit fails with that reason, its uv process group killed, and leaves no
half-made environment (the service then marks the set `failed` with the reason, as for every
BuildFailed: tests/integration/test_packages_api.py)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from services.packages.environments import BuildFailed, BuildLimits, EnvironmentStore, Installer, Target
from services.packages.settings import _base_interpreter
from tests.packages.local_index import standard_index

SLOW_SECONDS = 20.0
LIMIT_SECONDS = 2.0


def test_a_build_past_its_time_limit_fails_saying_so_and_leaves_nothing(tmp_path: Path) -> None:
    index = standard_index(tmp_path / "index")
    index.slow["tiny_slow-"] = SLOW_SECONDS  # its wheel's download takes this long
    store = EnvironmentStore(tmp_path / "store")
    target = Target.probe(_base_interpreter())

    async def build() -> str:
        deadline = asyncio.get_running_loop().time() + LIMIT_SECONDS
        with index.serve():
            installer = Installer(str(Path(sys.executable).parent / "uv"), index.url, store.cache)
            lock = await installer.resolve(["tiny-slow"], target, deadline)
            return await store.build(
                installer, lock, target, BuildLimits(1 << 30, LIMIT_SECONDS), deadline, lambda _n: None
            )

    started = time.monotonic()
    with pytest.raises(BuildFailed) as failed:
        asyncio.run(build())
    took = time.monotonic() - started
    assert str(failed.value) == "the build took longer than its time limit"
    # Stopped at the limit, not at the end of the download.
    assert LIMIT_SECONDS - 0.5 < took < LIMIT_SECONDS + 5, took
    assert store.keys() == [] and list(store.building.iterdir()) == []
