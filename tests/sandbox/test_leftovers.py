"""What a backend leaves on the host when a sandbox's start is cut short or the process that owns it
is SIGKILLed, against both backends (skipped where one cannot run).

- Cancelling starts at random moments (as closing the backend does to a warm-pool refill) leaves no
  process behind. Killing only bwrap's outer process while bwrap sets a sandbox up left its child,
  the sandbox's pid-1, waiting forever on an eventfd as root with parent 1 (about one in four).
- A SIGKILLed owner's sandboxes die with it, and `reap_leftovers` (what the executor runs at
  start-up) removes its runtime directory and cgroups while leaving a live backend's alone."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.executor.sandbox import SandboxUnavailable, create_backend, leftovers, reap_leftovers
from tests.sandbox.conftest import LoopThread

BACKENDS = ["bwrap", "gvisor"]


def processes_naming(text: str) -> list[tuple[int, bytes]]:
    """Live (not zombie) processes whose command line contains `text`, or whose working directory
    does (bwrap starts as ./bwrap from its backend's runtime directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        try:
            directory = os.readlink(entry / "cwd")
        except OSError:
            directory = ""
        if stat[stat.rfind(")") + 2 :][:1] != "Z" and (text.encode() in cmdline or text in directory):
            found.append((int(entry.name), cmdline[:100]))
    return found


def test_reaping_finds_a_process_by_its_working_directory(tmp_path: Path) -> None:
    """A dead owner's bwrap names its runtime directory only as its working directory."""
    stale = tmp_path / "pythonon-bwrap-gone"
    stale.mkdir()
    (stale / leftovers.OWNER_FILE).write_text(json.dumps({"pid": 2**22 + 1, "start": 1, "boot": ""}))
    assert leftovers.runtime_dir_is_stale(stale)
    sleeper = subprocess.Popen(["sleep", "60"], cwd=stale)  # noqa: S607 - coreutils' sleep
    try:
        reaped = leftovers.reap(temp_dir=tmp_path, cgroup_root=tmp_path / "no-cgroups")
        assert sleeper.wait(5) == -signal.SIGKILL
        assert sleeper.pid in reaped.processes and str(stale) in reaped.directories
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reaping_finds_a_sandbox_start_that_has_not_yet_entered_its_cgroup(tmp_path: Path) -> None:
    """The shell that starts bwrap names its runtime directory in its arguments from its first
    instant: one whose owner died before it entered its cgroup (held there by a FIFO standing for a
    cgroup.procs file) is found and killed, not left to start a sandbox after the reap."""
    from services.executor.sandbox.process import spawn

    stale = tmp_path / "pythonon-bwrap-gone"
    stale.mkdir()
    (stale / leftovers.OWNER_FILE).write_text(json.dumps({"pid": 2**22 + 1, "start": 1, "boot": ""}))
    procs = tmp_path / "cgroup.procs"
    os.mkfifo(procs)

    async def start_and_reap() -> None:
        starting = spawn([str(stale / "bwrap"), "--version"], cgroup_procs=[str(procs)], from_directory=True)
        try:
            deadline = time.monotonic() + 5
            while not processes_naming(str(procs)) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # until the shell has started and waits on the FIFO
            assert processes_naming(str(procs))
            reaped = leftovers.reap(temp_dir=tmp_path, cgroup_root=tmp_path / "no-cgroups")
            assert starting.pid in reaped.processes
            assert not processes_naming(str(procs))
        finally:
            starting.kill()
            starting.close()

    asyncio.run(start_and_reap())


def cgroups_of(pid: int) -> list[Path]:
    return [
        path
        for hierarchy in Path("/sys/fs/cgroup").iterdir()
        for prefix in leftovers.CGROUP_PREFIXES
        for path in hierarchy.glob(f"**/{prefix}{pid}-*")
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_cancelled_starts_leave_no_process_behind(name: str) -> None:
    loop = LoopThread()
    try:
        try:
            backend = create_backend(name, pool_size=0, languages=["python"])
        except SandboxUnavailable as error:
            pytest.skip(str(error))
        runtime_dir = str(backend._runtime_dir)  # noqa: SLF001 - what its processes name

        async def cancel_starts(count: int) -> None:
            profile = backend._default_profile("python")  # noqa: SLF001
            for _ in range(count):
                start = asyncio.ensure_future(backend._spawn(profile))  # noqa: SLF001
                await asyncio.sleep(random.uniform(0, 0.03))
                start.cancel()
                try:
                    sandbox = await start
                except asyncio.CancelledError:
                    continue
                backend._dispose(sandbox)  # noqa: SLF001 - started before the cancel came
            await backend.close()

        loop.call(cancel_starts(60 if name == "bwrap" else 15))
    finally:
        loop.stop()
    deadline = time.monotonic() + 5
    while processes_naming(runtime_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(runtime_dir) == []


OWNER = """
import asyncio, sys
from services.executor.sandbox import Limits, RunSpec, create_backend

async def main():
    backend = create_backend(sys.argv[1], pool_size=2)
    await backend.start()
    await backend._pool.fill(2)
    print(backend._runtime_dir, flush=True)
    code = "import os, time\\nos.fork()\\nprint('running', flush=True)\\ntime.sleep(100)"
    await backend.run(RunSpec("python", code, limits=Limits(timeout_seconds=60)))

asyncio.run(main())
"""


@pytest.mark.parametrize("name", BACKENDS)
def test_a_killed_owner_leaves_nothing_that_reaping_does_not_remove(name: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(OWNER), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        line = owner.stdout.readline().strip() if owner.stdout else ""
        if not line:
            owner.wait(30)
            message = owner.stderr.read() if owner.stderr else ""
            if "SandboxUnavailable" in message:
                pytest.skip(message.strip().splitlines()[-1])
            pytest.fail(f"the owner did not start: {message}")
        runtime_dir = Path(line)
        time.sleep(1.0)  # the run is running, the pool is full
        assert processes_naming(str(runtime_dir)) or cgroups_of(owner.pid)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # The sandboxes die with their owner (bwrap's --die-with-parent, runsc under PR_SET_PDEATHSIG).
    deadline = time.monotonic() + 5
    while processes_naming(str(runtime_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(str(runtime_dir)) == []
    # What a process cannot remove once killed: its runtime directory and cgroups.
    assert runtime_dir.exists() and leftovers.runtime_dir_is_stale(runtime_dir)

    live = create_backend("bwrap", pool_size=0, languages=["python"])  # another backend, alive
    try:
        reaped = reap_leftovers(name, {})
        assert str(runtime_dir) in reaped.directories
        assert not runtime_dir.exists() and cgroups_of(owner.pid) == []
        assert live._runtime_dir.exists()  # noqa: SLF001 - a live owner's is left alone
        assert not leftovers.runtime_dir_is_stale(live._runtime_dir)  # noqa: SLF001
    finally:
        asyncio.run(live.close())
