"""What only the gVisor backend does (the contract suite covers what every backend does): its own
kernel answers the program, and warm containers answer without waiting for runsc's teardown.
Skipped with the reason without runsc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sandbox.conftest import Sandbox, gvisor_factory


@pytest.fixture(scope="module")
def gvisor() -> Iterator[Sandbox]:
    with gvisor_factory() as started:
        yield started


def test_the_program_talks_to_gvisors_kernel(gvisor: Sandbox) -> None:
    result = gvisor.python("import os\nprint(os.uname().release)")
    assert result.exit_code == 0 and result.stdout.strip()
    assert result.stdout.strip() != Path("/proc/sys/kernel/osrelease").read_text().strip()


def test_a_warm_run_answers_before_the_container_is_torn_down(gvisor: Sandbox) -> None:
    durations = []
    for _ in range(5):
        time.sleep(0.6)  # the pool refills between requests, as in the service
        started = time.perf_counter()
        assert gvisor.python("print('hello')").stdout == "hello\n"
        durations.append(time.perf_counter() - started)
    # A cold container takes hundreds of milliseconds on this platform; a warm run a few.
    assert sorted(durations)[2] < 0.1, durations
