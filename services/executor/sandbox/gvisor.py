"""The gVisor backend: each run in its own single-use `runsc` container (OCI bundle, ptrace
platform by default, no network), with the same contract as the bwrap backend, taken warm from the
pool.

The container's root is an empty read-only directory holding only mount points; the language's
runtime and the system libraries are bound read-only, /tmp, /dev/shm and the working directory are
size-limited tmpfs, the program runs as uid 65534 with rlimits from the profile, and runsc puts the
sandbox in a pids cgroup from the profile and in a memory cgroup this backend makes (so that it
sets each run's memory limit and reads whether the kernel killed the sandbox for memory). gVisor's
own kernel stands between the program and the host's.

runsc hands a container nothing but stdio, so a warm container's bootstrap says "R" on stdout when
it waits, and the payload frame (code, environment, files and the private input, which the
bootstrap puts on fd 3) comes first on stdin, followed by the run's own stdin. The bootstrap ends
stderr with an end marker giving the exit status, so that a run is answered without waiting ~10 ms
for runsc to tear the sandbox down (it does so in the background, or is killed after a grace)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.executor.sandbox import cgroups, leftovers, runtimes
from services.executor.sandbox.host_backend import (
    NOBODY,
    BackendOptions,
    HostBackend,
    HostSandbox,
    raise_option,
)
from services.executor.sandbox.interface import (
    WORKDIR,
    Limits,
    OutputListener,
    RunResult,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
)
from services.executor.sandbox.process import PayloadRefused, children_of, spawn

log = logging.getLogger("pythonon.executor.sandbox.gvisor")

OPEN_FILES = 1024
SENTRY_THREADS = 64
PRIVATE_TMPFS = ("/tmp", "/dev/shm")  # noqa: S108 - inside the container
PLATFORMS = ("ptrace", "kvm", "systrap")
# After the end marker, runsc tears the sandbox down by itself; past this, it is killed.
TEARDOWN_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class GvisorOptions(BackendOptions):
    runsc_path: str | None = None  # default: runsc on PATH
    platform: str = "ptrace"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.runsc_path is not None and (
            not isinstance(self.runsc_path, str) or not os.path.isabs(self.runsc_path)
        ):
            raise_option("runsc_path", "an absolute path", self.runsc_path)
        if self.platform not in PLATFORMS:
            raise_option("platform", f"one of {', '.join(PLATFORMS)}", self.platform)


@dataclass(frozen=True)
class _Profile:
    language: str
    tmp_bytes: int
    file_bytes: int
    processes: int
    memory_bytes: int  # only where runsc makes the memory cgroup (else set per run)
    cpus: float
    readonly_paths: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class _Container(HostSandbox):
    name: str = ""
    bundle: Path | None = None
    memory: Path | None = None  # the memory cgroup this backend made for it
    ended: bool = False  # its program said how it ended; runsc is tearing it down
    killed: bool = False


class GvisorBackend(HostBackend[GvisorOptions, _Container]):
    name = "gvisor"
    options_type = GvisorOptions

    def __init__(self, options: GvisorOptions | None = None) -> None:
        options = options or GvisorOptions()
        runsc = options.runsc_path or shutil.which("runsc")
        if not runsc:
            raise SandboxUnavailable("gVisor's runsc is not installed (on Debian: apt-get install runsc)")
        if os.geteuid() != 0:
            raise SandboxUnavailable("the gvisor backend runs runsc as root, and this process is not root")
        self._runsc = runsc
        setpriv = shutil.which("setpriv")
        self._dies_with_parent = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        super().__init__(options)
        self._etc = self._write_etc(())
        # Named after its owner (pid and start time), so that a successor can tell it was left behind.
        owner = leftovers.owner_tag()
        self._cgroup_parent = f"{_own_cgroup('memory').rstrip('/')}/pythonon-gvisor-{owner}"
        memory_root = cgroups.v1_mountpoint("memory")
        self._memory_parent = memory_root / self._cgroup_parent.lstrip("/") if memory_root else None

    def enforced_limits(self) -> dict[str, bool]:
        return {
            "timeout": True,
            "output": True,
            "network": True,
            "memory": True,
            "processes": True,
            "cpu_time": True,
            "cpu_share": True,
            "file_size": True,
            "tmp_size": True,
            "non_root": True,
            "seccomp": True,  # gVisor's own: the program never reaches the host kernel directly
        }

    async def _close_host(self) -> None:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():  # what runsc left of our parent cgroup
            with contextlib.suppress(OSError):
                (hierarchy / self._cgroup_parent.lstrip("/")).rmdir()

    # -- one container --------------------------------------------------------------------------

    def _profile(self, language: str, limits: Limits, readonly_paths: Iterable[tuple[str, str]]) -> _Profile:
        return _Profile(
            language=language,
            tmp_bytes=limits.tmp_bytes,
            file_bytes=limits.file_bytes,
            processes=limits.processes,
            memory_bytes=0 if self._memory_parent else limits.memory_bytes,
            cpus=limits.cpus,
            readonly_paths=tuple((host, inside) for host, inside in readonly_paths),
        )

    async def _spawn(self, profile: _Profile) -> _Container:
        runtime = self._runtime(profile.language)
        name = f"pythonon-{os.getpid()}-{next(_CONTAINER_IDS)}"
        memory = None
        try:
            bundle = self._bundle(name, runtime, profile)
            if self._memory_parent is not None:
                memory = self._memory_parent / name
                memory.mkdir(parents=True)
            process = spawn(
                [
                    # runsc does not die with its parent by itself: a killed executor's containers
                    # would otherwise run on until their payload pipe closes.
                    *self._dies_with_parent,
                    self._runsc,
                    f"--root={self._runtime_dir / 'state'}",
                    "--network=none",
                    f"--platform={self.options.platform}",
                    "run",
                    f"--bundle={bundle}",
                    name,
                ]
            )
        except OSError as error:
            shutil.rmtree(self._runtime_dir / "bundles" / name, ignore_errors=True)
            if memory is not None:
                with contextlib.suppress(OSError):
                    memory.rmdir()
            raise SandboxError(f"cannot start runsc: {error}") from error
        container = self._track(_Container(profile, process, name=name, bundle=bundle, memory=memory))
        try:
            if not await process.wait_ready(self.options.spawn_timeout, on_stdout=True):
                message = process.read_available_stderr().decode(errors="replace").strip()
                raise SandboxError(
                    f"the {profile.language} container did not start: {message or 'no message'}"
                )
        except BaseException:
            self._dispose(container)
            raise
        return container

    async def _execute(
        self, sandbox: _Container, spec: RunSpec, on_output: OutputListener | None = None
    ) -> RunResult:
        runtime = self._runtime(spec.language)
        limits = spec.limits
        token, end_marker = runtimes.end_token()
        cpu = math.ceil(limits.timeout_seconds) + 1
        payload = runtime.payload(spec, cpu_seconds=cpu, inline_private=True, end_token=token)
        if sandbox.memory is not None:
            try:
                cgroups.SandboxCgroup(
                    [(cgroups.Hierarchy(1, frozenset({"memory"}), sandbox.memory.parent), sandbox.memory)]
                ).set_limits(limits.memory_bytes, limits.processes)
            except OSError as error:
                raise SandboxError(f"cannot apply limits to a container: {error}") from error
        try:
            outcome = await sandbox.process.execute(
                payload=b"",
                stdin=runtimes.frame(payload) + spec.stdin.encode(),
                private_input=b"",
                timeout=limits.timeout_seconds,
                output_cap=limits.output_bytes,
                kill=lambda: self._kill_now(sandbox),
                end_marker=end_marker,
                on_output=on_output,
            )
        except PayloadRefused:
            raise SandboxError("the container died before taking its payload") from None
        sandbox.ended = sandbox.process.returncode is None and not sandbox.killed
        if sandbox.memory is not None:
            oom = _oom_killed(sandbox.memory)
        else:
            # runsc's own cgroup is gone by now: a kill that was not the timeout is most likely memory.
            oom = outcome.exit_code == 137 and not outcome.timed_out
        return self._result(limits, outcome, out_of_memory=oom)

    def _kill(self, sandbox: _Container) -> None:
        if sandbox.ended and not sandbox.killed:
            # The program is done and runsc is tearing the sandbox down; kill only a straggler.
            loop = asyncio.get_running_loop()
            handle = loop.call_later(TEARDOWN_GRACE_SECONDS, self._kill_now, sandbox)
            sandbox.process.exited.add_done_callback(lambda _: handle.cancel())
            return
        self._kill_now(sandbox)

    def _kill_now(self, sandbox: _Container) -> None:
        # runsc's own processes (the sandbox's kernel and its gofer): gone at once, so is the
        # container; `runsc delete` then clears runsc's state.
        if sandbox.process.returncode is None:
            sandbox.killed = True
            _kill_tree(sandbox.process.pid)

    async def _release(self, sandbox: _Container) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sandbox.process.exited), TEARDOWN_GRACE_SECONDS + 10)
        sandbox.process.close()
        if sandbox.killed or sandbox.process.returncode is None:
            await self._delete(sandbox.name)
        if sandbox.bundle is not None:
            shutil.rmtree(sandbox.bundle, ignore_errors=True)
        if sandbox.memory is not None:
            for attempt in range(50):
                try:
                    sandbox.memory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    await asyncio.sleep(0.01 * min(attempt + 1, 10))

    async def _delete(self, container: str) -> None:
        process = await asyncio.create_subprocess_exec(
            self._runsc,
            f"--root={self._runtime_dir / 'state'}",
            "delete",
            "--force",
            container,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={},
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 30)

    def _bundle(self, container: str, runtime: runtimes.Runtime, profile: _Profile) -> Path:
        bundle = self._runtime_dir / "bundles" / container
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        lib_links = runtimes.system_library_links()
        binds = runtimes.unique_binds(
            [*runtime.binds, *runtimes.common_binds(), (str(self._etc), "/etc"), *profile.readonly_paths]
        )
        mounts: list[dict[str, Any]] = [{"destination": "/proc", "type": "proc", "source": "proc"}]
        for host, inside in binds:
            # A file is hard-linked into the read-only root rather than mounted: each mount costs
            # the sandbox's kernel threads (a Bash root holds ~200 files), and a link costs nothing.
            if not os.path.isdir(host) and _hard_link(host, rootfs / inside.lstrip("/")):
                continue
            _mount_point(rootfs, inside, directory=os.path.isdir(host))
            mounts.append({"destination": inside, "type": "bind", "source": host, "options": ["rbind", "ro"]})
        for target, link in [*lib_links, *runtime.symlinks]:
            path = rootfs / link.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
        for inside in (*PRIVATE_TMPFS, WORKDIR):
            _mount_point(rootfs, inside, directory=True)
            options = ["nosuid", "nodev", f"size={profile.tmp_bytes}", "mode=1777"]
            mounts.append({"destination": inside, "type": "tmpfs", "source": "tmpfs", "options": options})
        _readable_by_all(bundle)
        env = runtime.environment(RunSpec(profile.language, ""))

        def rlimit(name: str, value: int, hard: int | None = None) -> dict[str, Any]:
            return {"type": name, "soft": value, "hard": value if hard is None else hard}

        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": NOBODY, "gid": NOBODY},
                "args": list(runtime.command_stdin),
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": WORKDIR,
                "noNewPrivileges": True,
                "capabilities": {
                    "bounding": [],
                    "effective": [],
                    "inheritable": [],
                    "permitted": [],
                    "ambient": [],
                },
                "rlimits": [
                    rlimit("RLIMIT_CPU", self._cpu_ceiling, self._cpu_ceiling + 1),
                    rlimit("RLIMIT_FSIZE", profile.file_bytes),
                    rlimit("RLIMIT_NOFILE", OPEN_FILES),
                    rlimit("RLIMIT_CORE", 0),
                    # No RLIMIT_NPROC: runsc applies it to its own host processes too, and the
                    # sandbox's kernel then cannot start the program's first thread.
                ],
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                # Under the process's own cgroup, not at the root of the hierarchy.
                "cgroupsPath": f"{self._cgroup_parent}/{container}",
                "resources": {
                    # Ignored where this backend made the memory cgroup itself (it sets the run's own).
                    "memory": {"limit": profile.memory_bytes, "swap": profile.memory_bytes},
                    # The cgroup counts the sandbox's own kernel threads too (ptrace platform).
                    "pids": {"limit": profile.processes + SENTRY_THREADS},
                    # The whole sandbox, its own kernel included, gets this share of the CPUs.
                    "cpu": {
                        "quota": max(1000, round(profile.cpus * cgroups.CPU_PERIOD_MICROSECONDS)),
                        "period": cgroups.CPU_PERIOD_MICROSECONDS,
                    },
                },
            },
        }
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle


# One sequence per process: two backends alive in one process share the owner's cgroup parent and
# runsc's container namespace, so their containers must not be numbered alike.
_CONTAINER_IDS = itertools.count()


def _own_cgroup(controller: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(",") or (not controllers and controller == ""):
                return path
    return "/"


def _oom_killed(memory: Path) -> bool:
    with contextlib.suppress(OSError):
        for line in (memory / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
    return False


def _kill_tree(pid: int) -> None:
    pending, found = [pid], []
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children_of(current))
    for member in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)


def _readable_by_all(root: Path) -> None:
    """Directories 0755 and files 0644 under root, whatever the service's umask (the runner's is 077):
    the sandbox's unprivileged uid must be able to reach its mount points and /etc. Hard links to host
    files are left alone: a mode change would change the host file's."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        elif path.stat().st_nlink == 1:
            path.chmod(0o644)


def _hard_link(host: str, target: Path) -> bool:
    """Link a host file into a container's root; False where the two are on different filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(host), target)
    except FileExistsError:
        return True
    except OSError:
        return False
    return True


def _mount_point(rootfs: Path, inside: str, directory: bool) -> None:
    path = rootfs / inside.lstrip("/")
    if directory:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
