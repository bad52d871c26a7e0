"""The gVisor backend: each run in its own `runsc` container (OCI bundle, ptrace platform by
default, no network), with the same contract as the bwrap backend.

The container's root is an empty read-only directory holding only mount points; the language's
runtime and the system libraries are bound read-only, /tmp, /dev/shm and the working directory are
size-limited tmpfs, the program runs as uid 65534 with rlimits from the spec, and runsc puts the
sandbox in a memory and pids cgroup from the spec's resources. gVisor's own kernel stands between
the program and the host's.

runsc hands a container nothing but stdio, so the payload (code, environment, files and the
private input, which the bootstrap puts on fd 3) travels first on stdin, framed as b"<length>\\n",
followed by the run's own stdin. There is no warm pool: a container starts per run (a few hundred
milliseconds), and the timeout counts from the moment the container is asked to start."""

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
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from services.executor.sandbox import runtimes
from services.executor.sandbox.admission import Admission
from services.executor.sandbox.interface import (
    WORKDIR,
    RunResult,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
    describe_bytes,
    result_of,
    validate_spec,
)
from services.executor.sandbox.process import Outcome, children_of, spawn

log = logging.getLogger("pythonon.executor.sandbox.gvisor")

NOBODY = 65534
OPEN_FILES = 1024
SENTRY_THREADS = 64
PRIVATE_TMPFS = ("/tmp", "/dev/shm")  # noqa: S108 - inside the container


class GvisorBackend:
    name = "gvisor"

    def __init__(
        self,
        *,
        runsc_path: str | None = None,
        platform: str = "ptrace",
        max_concurrent: int | None = None,
        max_waiting: int | None = None,
        languages: Iterable[str] | None = None,
        python: str | None = None,
        node: str | None = None,
        bash: str | None = None,
        max_timeout_seconds: float = 60.0,
        **_ignored: Any,  # options meant for the bwrap backend (pool_size, default_limits, ...)
    ) -> None:
        runsc = runsc_path or shutil.which("runsc")
        if not runsc:
            raise SandboxUnavailable("gVisor's runsc is not installed (on Debian: apt-get install runsc)")
        if os.geteuid() != 0:
            raise SandboxUnavailable("the gvisor backend runs runsc as root, and this process is not root")
        self._runsc = runsc
        self._platform = platform
        self.max_concurrent = max_concurrent or 2 * (os.cpu_count() or 1)
        waiting = self.max_concurrent if max_waiting is None else max_waiting
        self._admission = Admission(self.max_concurrent, waiting)
        self._cpu_ceiling = math.ceil(max_timeout_seconds) + 1
        self._dir = Path(tempfile.mkdtemp(prefix="pythonon-gvisor-"))
        self._dir.chmod(0o755)
        found, self.unavailable = runtimes.discover(
            self._dir, {"python": python, "javascript": node, "bash": bash}
        )
        wanted = set(languages) if languages is not None else None
        self._runtimes = {k: v for k, v in found.items() if wanted is None or k in wanted}
        (self._dir / "etc").mkdir(mode=0o755)
        (self._dir / "etc" / "passwd").write_text(f"nobody:x:{NOBODY}:{NOBODY}:nobody:{WORKDIR}:/bin/sh\n")
        (self._dir / "etc" / "group").write_text(f"nogroup:x:{NOBODY}:\n")
        (self._dir / "etc" / "hosts").write_text("127.0.0.1 localhost sandbox\n")
        _readable_by_all(self._dir / "etc")
        self._ids = itertools.count()
        self._cgroup_parent = f"{_own_cgroup('memory').rstrip('/')}/pythonon-gvisor-{os.getpid()}"
        self._running: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._closed = False

    def languages(self) -> list[str]:
        return sorted(self._runtimes)

    def enforced_limits(self) -> dict[str, bool]:
        return {
            "timeout": True,
            "output": True,
            "network": True,
            "memory": True,
            "processes": True,
            "cpu_time": True,
            "file_size": True,
            "tmp_size": True,
            "non_root": True,
            "seccomp": True,  # gVisor's own: the program never reaches the host kernel directly
        }

    async def start(self) -> None:
        """Run one hello-world per language; drop a language that fails, raise when all do."""
        failures = {}
        for language in self.languages():
            code = {"python": "print('ok')", "javascript": "console.log('ok')", "bash": "echo ok"}[language]
            try:
                result = await self.run(RunSpec(language, code))
            except SandboxError as error:
                failures[language] = str(error)
                continue
            if result.stdout != "ok\n":
                failures[language] = result.stderr.strip() or f"exit status {result.exit_code}"
        for language, reason in failures.items():
            log.warning("gVisor sandbox for %s cannot start: %s", language, reason)
            self.unavailable[language] = reason
            del self._runtimes[language]
        if not self._runtimes:
            await self.close()
            raise SandboxUnavailable(
                "runsc cannot run a sandbox here: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
            )

    async def run(self, spec: RunSpec) -> RunResult:
        validate_spec(spec, self.languages())
        if self._closed:
            raise SandboxError("the sandbox backend is closed")
        runtime = self._runtimes[spec.language]
        cpu = math.ceil(spec.limits.timeout_seconds) + 1
        payload = runtime.payload(spec, cpu_seconds=cpu, inline_private=True)
        async with self._admission.slot():
            container = f"pythonon-{os.getpid()}-{next(self._ids)}"
            bundle = self._bundle(container, runtime, spec)
            self._running.add(container)
            try:
                process = spawn(
                    [
                        self._runsc,
                        f"--root={self._dir / 'state'}",
                        "--network=none",
                        f"--platform={self._platform}",
                        "run",
                        f"--bundle={bundle}",
                        container,
                    ]
                )
            except OSError as error:
                self._running.discard(container)
                shutil.rmtree(bundle, ignore_errors=True)
                raise SandboxError(f"cannot start runsc: {error}") from error
            loop = asyncio.get_running_loop()
            killing: list[asyncio.Task[None]] = []

            def kill() -> None:
                # runsc's own processes (the sandbox's kernel and its gofer): gone at once, so is the
                # container; `delete` then clears runsc's state.
                _kill_tree(process.pid)
                if not killing:
                    killing.append(loop.create_task(self._delete(container)))

            try:
                outcome = await process.execute(
                    payload=b"",
                    stdin=f"{len(payload)}\n".encode() + payload + spec.stdin.encode(),
                    private_input=b"",
                    timeout=spec.limits.timeout_seconds,
                    output_cap=spec.limits.output_bytes,
                    kill=kill,
                )
            finally:
                process.kill()
                process.close()
                cleanup = loop.create_task(self._clean_up(container, bundle))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
        return self._result(spec, outcome)

    async def _clean_up(self, container: str, bundle: Path) -> None:
        try:
            await self._delete(container)
        finally:
            self._running.discard(container)
            shutil.rmtree(bundle, ignore_errors=True)

    def replenish(self) -> None:
        """Nothing to make up: there is no warm pool."""

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.gather(*(self._delete(c) for c in list(self._running)), return_exceptions=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():  # what runsc left of our parent cgroup
            with contextlib.suppress(OSError):
                (hierarchy / self._cgroup_parent.lstrip("/")).rmdir()

    def _result(self, spec: RunSpec, outcome: Outcome) -> RunResult:
        limits = spec.limits
        # runsc reports no OOM event here: a kill that was not the timeout is most likely the memory cap.
        killed = outcome.exit_code == 137 and not outcome.timed_out
        memory = describe_bytes(limits.memory_bytes)
        return result_of(
            limits,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=outcome.exit_code,
            duration_seconds=outcome.duration_seconds,
            timed_out=outcome.timed_out,
            overflowed=outcome.overflowed,
            memory_note=f"killed; the memory limit of {memory} was probably exceeded" if killed else None,
        )

    async def _delete(self, container: str) -> None:
        process = await asyncio.create_subprocess_exec(
            self._runsc,
            f"--root={self._dir / 'state'}",
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

    def _bundle(self, container: str, runtime: runtimes.Runtime, spec: RunSpec) -> Path:
        limits = spec.limits
        bundle = self._dir / "bundles" / container
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        lib_binds, lib_links = runtimes.system_library_binds()
        binds = [*lib_binds, *runtime.binds, (str(self._dir / "etc"), "/etc"), *spec.readonly_paths]
        mounts: list[dict[str, Any]] = [{"destination": "/proc", "type": "proc", "source": "proc"}]
        for host, inside in binds:
            _mount_point(rootfs, inside, directory=os.path.isdir(host))
            mounts.append({"destination": inside, "type": "bind", "source": host, "options": ["rbind", "ro"]})
        for target, link in [*lib_links, *runtime.symlinks]:
            path = rootfs / link.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
        for inside in (*PRIVATE_TMPFS, WORKDIR):
            _mount_point(rootfs, inside, directory=True)
            options = ["nosuid", "nodev", f"size={limits.tmp_bytes}", "mode=1777"]
            mounts.append({"destination": inside, "type": "tmpfs", "source": "tmpfs", "options": options})
        _readable_by_all(bundle)
        env = runtime.environment(RunSpec(spec.language, ""))

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
                    rlimit("RLIMIT_FSIZE", limits.file_bytes),
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
                    "memory": {"limit": limits.memory_bytes, "swap": limits.memory_bytes},
                    # The cgroup counts the sandbox's own kernel threads too (ptrace platform).
                    "pids": {"limit": limits.processes + SENTRY_THREADS},
                },
            },
        }
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle


def _own_cgroup(controller: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(",") or (not controllers and controller == ""):
                return path
    return "/"


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
    the sandbox's unprivileged uid must be able to reach its mount points and /etc. Only for trees this
    backend wrote itself: on a hard link to a host file it would change the host file's mode."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def _mount_point(rootfs: Path, inside: str, directory: bool) -> None:
    path = rootfs / inside.lstrip("/")
    if directory:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
