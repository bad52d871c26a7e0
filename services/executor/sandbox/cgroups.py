"""Per-sandbox memory, process-count and CPU limits through cgroups, on v2 or v1 hierarchies (or a
mix, one controller each), found once at start-up from /proc/self/mountinfo and /proc/self/cgroup.

Sandbox cgroups are created under the service's own cgroup (so whatever limits the service has
still bound its sandboxes), inside one directory per backend named after its owner:
`pythonon-sandbox-<pid>-<start time>-<instance>` (see leftovers: what a killed executor left is
recognised, and removed, by the next one)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.sandbox import leftovers

log = logging.getLogger("pythonon.executor.sandbox.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")
# The CPU quota's period: 100 ms, the kernel's default; a run gets `cpus` times this per period.
CPU_PERIOD_MICROSECONDS = 100_000
PREFIX = "pythonon-sandbox-"


@dataclass
class Hierarchy:
    version: int  # 1 or 2
    controllers: frozenset[str]
    base: Path  # our directory, under which each sandbox gets one


@dataclass
class CgroupSupport:
    """The hierarchies in use and, for each controller that is not, the reason."""

    hierarchies: list[Hierarchy] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def memory(self) -> bool:
        return any("memory" in h.controllers for h in self.hierarchies)

    @property
    def pids(self) -> bool:
        return any("pids" in h.controllers for h in self.hierarchies)

    @property
    def cpu(self) -> bool:
        return any("cpu" in h.controllers for h in self.hierarchies)

    def procs_files(self, cgroup: SandboxCgroup) -> list[str]:
        """The cgroup.procs file of `cgroup` in each hierarchy: a process that writes 0 into each
        moves itself (and so everything it starts afterwards) into the sandbox's cgroup."""
        return [str(path / "cgroup.procs") for _, path in cgroup.dirs]

    def describe(self) -> str:
        parts = [
            f"{','.join(sorted(h.controllers))} via cgroup v{h.version} at {h.base}" for h in self.hierarchies
        ]
        parts += [f"no {name} limit: {reason}" for name, reason in sorted(self.missing.items())]
        return "; ".join(parts)

    def create(self, name: str) -> SandboxCgroup:
        dirs = []
        try:
            for hierarchy in self.hierarchies:
                path = hierarchy.base / name
                path.mkdir()
                dirs.append((hierarchy, path))
        except OSError:
            SandboxCgroup(dirs).remove()
            raise
        return SandboxCgroup(dirs)

    def close(self) -> None:
        for hierarchy in self.hierarchies:
            _remove_tree(hierarchy.base)
        self.hierarchies = []


class SandboxCgroup:
    """One sandbox's cgroup in each hierarchy in use."""

    def __init__(self, dirs: list[tuple[Hierarchy, Path]]) -> None:
        self._dirs = dirs

    @property
    def dirs(self) -> list[tuple[Hierarchy, Path]]:
        return list(self._dirs)

    def add_process(self, pid: int) -> None:
        for _, path in self._dirs:
            _write(path / "cgroup.procs", str(pid))

    def set_limits(self, memory_bytes: int, processes: int, cpus: float | None = None) -> None:
        """Memory (no swap), process count and, given `cpus`, a CPU quota of that many cores."""
        for hierarchy, path in self._dirs:
            if "cpu" in hierarchy.controllers and cpus is not None:
                quota = max(1000, round(cpus * CPU_PERIOD_MICROSECONDS))
                if hierarchy.version == 2:
                    _write(path / "cpu.max", f"{quota} {CPU_PERIOD_MICROSECONDS}")
                else:
                    _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_MICROSECONDS))
                    _write(path / "cpu.cfs_quota_us", str(quota))
            if "memory" in hierarchy.controllers:
                if hierarchy.version == 2:
                    _write(path / "memory.max", str(memory_bytes))
                    _write_if_present(path / "memory.swap.max", "0")
                else:
                    _write(path / "memory.limit_in_bytes", str(memory_bytes))
                    _write_if_present(path / "memory.memsw.limit_in_bytes", str(memory_bytes))
                    _write_if_present(path / "memory.swappiness", "0")
            if "pids" in hierarchy.controllers:
                _write(path / "pids.max", str(processes))

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process here for exceeding the memory limit."""
        for hierarchy, path in self._dirs:
            if "memory" not in hierarchy.controllers:
                continue
            if hierarchy.version == 2:
                counters = _read_counters(path / "memory.events")
                return counters.get("oom_kill", 0) > 0
            counters = _read_counters(path / "memory.oom_control")
            if "oom_kill" in counters:
                return counters["oom_kill"] > 0
            return _read_int(path / "memory.failcnt") > 0  # kernels before 4.13
        return False

    def processes(self) -> list[int]:
        found: set[int] = set()
        for _, path in self._dirs:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL everything in the cgroup: cgroup.kill on v2, else each process it lists."""
        for hierarchy, path in self._dirs:
            if hierarchy.version == 2 and (path / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(path / "cgroup.kill", "1")
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup directories; False while processes are still leaving them."""
        removed = True
        for _, path in self._dirs:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as error:
                if error.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", path, error)
                removed = False
        return removed


def detect(instance: str, proc: Path = Path("/proc"), parent: Path | None = None) -> CgroupSupport:
    """Find where this process may create memory and pids cgroups, and create the base directory
    of one backend (`instance` tells it from other backends of the same process).

    `parent`, when given, is a delegated directory to use instead of the process's own cgroup."""
    support = CgroupSupport()
    try:
        mounts = _parse_mountinfo((proc / "self/mountinfo").read_text())
        membership = _parse_membership((proc / "self/cgroup").read_text())
    except OSError as error:
        support.missing = dict.fromkeys(CONTROLLERS, f"cannot read cgroup information: {error}")
        return support
    name = f"{PREFIX}{leftovers.owner_tag()}-{instance}"
    v2_wanted: list[str] = []
    for controller in CONTROLLERS:
        v1 = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if v1 is None:
            v2_wanted.append(controller)
            continue
        own = parent or v1.path_of(membership.get(controller))
        if own is None:
            support.missing[controller] = "this process's cgroup v1 path is unknown"
            continue
        try:
            base = _make_base(own, name)
        except OSError as error:
            support.missing[controller] = f"cannot create a cgroup under {own}: {error.strerror}"
            continue
        support.hierarchies.append(Hierarchy(1, frozenset({controller}), base))
    if v2_wanted:
        _detect_v2(support, mounts, membership, v2_wanted, parent, name)
    return support


def v1_mountpoint(controller: str, proc: Path = Path("/proc")) -> Path | None:
    """Where the cgroup v1 hierarchy holding `controller` is mounted; None without one."""
    try:
        mounts = _parse_mountinfo((proc / "self/mountinfo").read_text())
    except OSError:
        return None
    found = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
    return Path(found.mountpoint) if found is not None and found.root == "/" else None


def _detect_v2(
    support: CgroupSupport,
    mounts: list[_Mount],
    membership: dict[str, str],
    wanted: list[str],
    parent: Path | None,
    name: str,
) -> None:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    own = parent or (mount.path_of(membership.get("")) if mount else None)
    if own is None:
        for controller in wanted:
            support.missing[controller] = "no cgroup hierarchy has this controller"
        return
    try:
        available = set((own / "cgroup.controllers").read_text().split())
    except OSError as error:
        available = set()
        log.info("cannot read %s: %s", own / "cgroup.controllers", error)
    usable = [c for c in wanted if c in available]
    for controller in wanted:
        if controller not in available:
            support.missing[controller] = f"the cgroup v2 controller is not enabled for {own}"
    if not usable:
        return
    try:
        own = _enable_v2_subtree(own, usable)
        base = _make_base(own, name)
        _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in usable))
    except OSError as error:
        for controller in usable:
            support.missing[controller] = (
                f"cannot delegate cgroup v2 controllers under {own}: {error.strerror}"
            )
        return
    support.hierarchies.append(Hierarchy(2, frozenset(usable), base))


def _enable_v2_subtree(own: Path, controllers: list[str]) -> Path:
    """Make `controllers` available to children of `own`, which cgroup v2 allows only when `own` has
    no processes of its own. When this process is alone there, it moves into a leaf child first."""
    enabled = set((own / "cgroup.subtree_control").read_text().split())
    missing = [c for c in controllers if c not in enabled]
    if not missing:
        return own
    request = " ".join(f"+{c}" for c in missing)
    try:
        _write(own / "cgroup.subtree_control", request)
        return own
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
    members = [int(p) for p in (own / "cgroup.procs").read_text().split()]
    if members != [os.getpid()]:
        raise OSError(errno.EBUSY, f"{own} holds other processes; pass a delegated cgroup_parent")
    leaf = own / "pythonon-executor"
    leaf.mkdir(exist_ok=True)
    _write(leaf / "cgroup.procs", str(os.getpid()))
    _write(own / "cgroup.subtree_control", request)
    return own


def _make_base(own: Path, name: str) -> Path:
    _remove_stale(own)
    base = own / name
    base.mkdir(exist_ok=True)
    return base


def _remove_stale(own: Path) -> None:
    """Remove the leftovers of backends whose process is gone, killing what is still in them."""
    with contextlib.suppress(OSError):
        for entry in own.iterdir():
            if entry.name.startswith(PREFIX) and entry.is_dir() and leftovers.cgroup_is_stale(entry.name):
                leftovers.kill_cgroup_processes(entry)
                _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            if child.is_dir():
                _remove_tree(child)
        path.rmdir()


@dataclass
class _Mount:
    root: str
    mountpoint: str
    fstype: str
    options: frozenset[str]

    def path_of(self, cgroup_path: str | None) -> Path | None:
        if cgroup_path is None:
            return None
        relative = os.path.relpath(cgroup_path, self.root) if cgroup_path.startswith(self.root) else None
        if relative is None or relative.startswith(".."):
            return None
        return Path(os.path.normpath(os.path.join(self.mountpoint, relative)))


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(","))
        mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, options))
    return mounts


def _parse_membership(text: str) -> dict[str, str]:
    """controller -> path; the v2 path is under the key ""."""
    membership: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            membership[controller] = path
    return membership


def _unescape(value: str) -> str:
    return value.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_if_present(path: Path, value: str) -> None:
    with contextlib.suppress(FileNotFoundError, PermissionError):
        _write(path, value)


def _read_counters(path: Path) -> dict[str, int]:
    counters = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                counters[key] = int(value)
    return counters


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
