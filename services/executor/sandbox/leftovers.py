"""What a killed executor leaves on the host, and how the next one clears it away at start-up.

An executor that ends normally kills its sandboxes and removes everything it made. One that is
SIGKILLed cannot: its runtime directory (`pythonon-<backend>-*` in the temporary directory), its
cgroups and, rarely, processes outlive it. Everything it makes is therefore marked with its owner,
a live process named by its pid *and* start time (a pid alone may be reused), plus the boot id for
what survives a reboot:

- a runtime directory holds an `owner` file;
- a cgroup directory is named `pythonon-sandbox-<pid>-<start time>-<instance>` (bwrap) or
  `pythonon-gvisor-<pid>-<start time>` (gVisor);
- a block of sandbox uids is held by an flock that the kernel releases when its holder dies.

`reap` removes only what belongs to an owner that is gone, so that it never touches another live
executor's sandboxes: processes that name a dead owner's runtime directory in their command line
(runsc, the shell that starts bwrap) or have it as their working directory (bwrap), processes
in its cgroups, processes of a uid block nobody holds, and then the directories themselves."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pythonon.executor.sandbox.leftovers")

OWNER_FILE = "owner"
RUNTIME_DIR_PREFIXES = ("pythonon-bwrap-", "pythonon-gvisor-")
CGROUP_PREFIXES = ("pythonon-sandbox-", "pythonon-gvisor-")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None
    when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def owner_tag(pid: int | None = None) -> str:
    """`<pid>-<start time>`: this process (or `pid`) as cgroup names record their owner."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid) or 0}"


def is_alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` exists and is the one that started at `started` (None: any)."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def mark_owner(directory: Path) -> None:
    """Record this process as the owner of `directory` (a runtime directory)."""
    record = {"pid": os.getpid(), "start": start_time(os.getpid()), "boot": boot_id()}
    path = directory / OWNER_FILE
    path.write_text(json.dumps(record))
    path.chmod(0o600)


def runtime_dir_is_stale(directory: Path) -> bool:
    """Whether the owner recorded in `directory` is gone. A directory without a readable record is
    left alone: it may be one being created this instant, or not ours."""
    try:
        record = json.loads((directory / OWNER_FILE).read_text())
        pid, started, boot = int(record["pid"]), record.get("start"), str(record.get("boot", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if boot and boot != boot_id():
        return True
    return not is_alive(pid, int(started) if started is not None else None)


def cgroup_is_stale(name: str) -> bool:
    """Whether the owner named in a cgroup directory's name is gone: `<prefix><pid>-<start>[-...]`,
    or the older `<prefix><pid>[-instance]` (judged by the pid alone)."""
    prefix = next((p for p in CGROUP_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return False
    parts = name[len(prefix) :].split("-")
    if not parts[0].isdigit():
        return False
    # bwrap's names end with an instance, gVisor's with the start time.
    recorded = len(parts) >= 3 or (prefix == "pythonon-gvisor-" and len(parts) == 2)
    started = int(parts[1]) if recorded and parts[1].isdigit() else None
    return not is_alive(int(parts[0]), started)


@dataclass
class Reaped:
    """What `reap` found and removed."""

    processes: list[int] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.directories or self.cgroups)

    def describe(self) -> str:
        return (
            f"{len(self.processes)} processes, {len(self.directories)} runtime directories, "
            f"{len(self.cgroups)} cgroups"
        )


def reap(
    temp_dir: Path | None = None,
    uid_base: int | None = None,
    uid_block: int = 4096,
    uid_locks: Path | None = None,
    cgroup_root: Path = CGROUP_ROOT,
) -> Reaped:
    """Kill and remove what executors that are gone left behind (see the module's docstring).
    `uid_base`/`uid_block`/`uid_locks`: the sandbox uid blocks (bwrap as root) to sweep."""
    reaped = Reaped()
    temp = temp_dir or Path(tempfile.gettempdir())
    stale_dirs = [
        entry
        for entry in _entries(temp)
        if entry.name.startswith(RUNTIME_DIR_PREFIXES) and entry.is_dir() and runtime_dir_is_stale(entry)
    ]
    stale_cgroups = [path for path in _sandbox_cgroups(cgroup_root) if cgroup_is_stale(path.name)]
    # Kill first, remove afterwards: a process may hold what is to be removed.
    markers = [str(directory) + "/" for directory in stale_dirs]
    for _ in range(20):
        victims = set(_processes_naming(markers)) if markers else set()
        for group in stale_cgroups:
            victims.update(_cgroup_processes(group))
        victims.discard(os.getpid())
        if not victims:
            break
        _kill_all(victims)
        reaped.processes.extend(sorted(victims - set(reaped.processes)))
        time.sleep(0.05)
    if uid_base is not None and uid_locks is not None:
        reaped.processes.extend(_reap_free_uid_blocks(uid_base, uid_block, uid_locks))
    for directory in stale_dirs:
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            reaped.directories.append(str(directory))
    for group in sorted(stale_cgroups, key=lambda p: len(p.parts), reverse=True):
        if _remove_cgroup_tree(group):
            reaped.cgroups.append(str(group))
    if reaped:
        log.warning("removed what an executor that is gone left behind: %s", reaped.describe())
    return reaped


def kill_cgroup_processes(group: Path, rounds: int = 50) -> bool:
    """SIGKILL every process in a cgroup directory (and its children) until none is left; on cgroup
    v1 there is no atomic kill, so what forks meanwhile is caught by the next round."""
    for _ in range(rounds):
        victims = set(_cgroup_processes(group))
        if not victims:
            return True
        _kill_all(victims)
        time.sleep(0.01)
    return not _cgroup_processes(group)


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _sandbox_cgroups(root: Path) -> Iterator[Path]:
    """The sandbox cgroup directories of every hierarchy: top-level ones, and those one or two levels
    down (under the executor's own cgroup, wherever the runner put it)."""
    for hierarchy in _entries(root):
        if not hierarchy.is_dir() or hierarchy.is_symlink():
            continue
        level = [hierarchy]
        for _ in range(3):
            below = []
            for directory in level:
                for entry in _entries(directory):
                    if not entry.is_dir():
                        continue
                    if entry.name.startswith(CGROUP_PREFIXES):
                        yield entry
                    else:
                        below.append(entry)
            level = below


def _cgroup_processes(group: Path) -> list[int]:
    found = []
    for directory in [group, *_subdirectories(group)]:
        with contextlib.suppress(OSError, ValueError):
            found += [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    return found


def _subdirectories(group: Path) -> list[Path]:
    found = []
    for entry in _entries(group):
        if entry.is_dir():
            found += [entry, *_subdirectories(entry)]
    return found


def _remove_cgroup_tree(group: Path) -> bool:
    for directory in sorted(_subdirectories(group), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError as error:
        log.warning("cannot remove the leftover cgroup %s: %s", group, error)
        return False
    return True


def _processes_naming(markers: Iterable[str]) -> Iterator[int]:
    """Processes whose command line names one of `markers` (a runtime directory's path, ending in
    "/"), or whose working directory is one (bwrap, started from there as ./bwrap)."""
    markers = list(markers)
    wanted = [marker.encode() for marker in markers]
    for entry in _entries(Path("/proc")):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(marker in cmdline for marker in wanted):
            yield int(entry.name)
            continue
        with contextlib.suppress(OSError):
            directory = os.readlink(entry / "cwd") + "/"
            if any(directory.startswith(marker) for marker in markers):
                yield int(entry.name)


def _reap_free_uid_blocks(uid_base: int, uid_block: int, locks: Path) -> list[int]:
    """Kill the processes of every uid block whose lock nobody holds (its backend is gone); each
    block is locked while it is swept, so no backend can claim it meanwhile."""
    by_uid: dict[int, list[int]] = {}
    for entry in _entries(Path("/proc")):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uid = entry.stat().st_uid
                if uid >= uid_base:
                    by_uid.setdefault(uid, []).append(int(entry.name))
    if not by_uid:
        return []
    killed: list[int] = []
    for index in sorted({(uid - uid_base) // uid_block for uid in by_uid}):
        lock = locks / f"block-{index}"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # not a block any backend ever claimed
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live backend holds it
            first = uid_base + index * uid_block
            victims = [pid for uid in range(first, first + uid_block) for pid in by_uid.get(uid, ())]
            killed += victims
            for _ in range(20):
                if not victims:
                    break
                _kill_all(victims)
                time.sleep(0.05)
                victims = [pid for pid in victims if _running(pid)]
        finally:
            os.close(fd)
    return killed


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] != "Z"


def _kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
