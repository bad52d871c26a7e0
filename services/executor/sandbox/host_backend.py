"""What every backend that starts its sandboxes as child processes of this host shares (bwrap,
gvisor): validated options, runtime discovery from the language table, admission, the warm pool,
the start-up check of each language, a run's life (validate, take a warm sandbox or start one,
execute, dispose), /etc for the sandbox, the result, and a clean close. A backend subclass says how
one sandbox starts, runs a payload, dies and is released."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, NoReturn, Self, TypeVar

from services.executor.sandbox import leftovers
from services.executor.sandbox.admission import Admission, host_capacity
from services.executor.sandbox.interface import (
    WORKDIR,
    Limits,
    OutputListener,
    RunResult,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
    describe_bytes,
    result_of,
    validate_spec,
)
from services.executor.sandbox.languages import LANGUAGES, SMOKE_TEST_OUTPUT, discover
from services.executor.sandbox.process import Outcome, SandboxProcess
from services.executor.sandbox.runtimes import Runtime
from services.executor.sandbox.warm_pool import WarmPool

# Warm pools kept for profiles with read-only mounts (package environments), the most recent ones.
RECENT_MOUNT_PROFILES = 4

log = logging.getLogger("pythonon.executor.sandbox")

NOBODY = 65534


class BackendOptionError(ValueError):
    """An option given to a backend is unknown or has a bad value; the message names it."""


@dataclass(frozen=True)
class BackendOptions:
    """Options every host backend takes; a backend adds its own in a subclass."""

    pool_size: int = 4  # warm sandboxes per language (0: none)
    # Admission (see admission.py). Runs at once; default: sized by memory and cores.
    max_concurrent: int | None = None
    runs_per_core: float = 4.0  # runs sharing a core when max_concurrent is sized (most sleep or wait)
    host_sharers: int = 1  # executors on this host: each sizes max_concurrent for its share
    max_runs_per_user: int | None = None  # one user's runs at once (default: half of max_concurrent)
    max_queue_seconds: float = 30.0  # longest expected wait in line before SandboxBusy (0: no waiting)
    max_waiting_per_user: int = 100  # one user's runs waiting in line before SandboxBusy
    languages: tuple[str, ...] | None = None  # only these (default: every language found)
    executables: Mapping[str, str] = field(default_factory=dict)  # language -> interpreter path
    spawn_timeout: float = 30.0  # seconds a sandbox may take to start
    max_timeout_seconds: float = 60.0  # the longest run timeout (RLIMIT_CPU's ceiling)
    # Pooled sandboxes are started for these limits; a run whose fixed limits differ gets its own.
    default_limits: Limits = field(default_factory=Limits)

    @classmethod
    def parse(cls, backend: str, options: Mapping[str, Any]) -> Self:
        """Options from keywords: an unknown name or a bad value is a BackendOptionError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BackendOptionError(
                f"unknown option {unknown[0]!r} for the {backend} sandbox backend; "
                f"known options: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def __post_init__(self) -> None:
        _integer(self, "pool_size", minimum=0)
        _integer(self, "max_concurrent", minimum=1, optional=True)
        _number(self, "runs_per_core")
        _integer(self, "host_sharers", minimum=1)
        _integer(self, "max_runs_per_user", minimum=1, optional=True)
        _number(self, "max_queue_seconds", zero_allowed=True)
        _integer(self, "max_waiting_per_user", minimum=0)
        _number(self, "spawn_timeout")
        _number(self, "max_timeout_seconds")
        languages = self.languages
        if languages is not None:
            if isinstance(languages, str) or not isinstance(languages, Iterable):
                raise BackendOptionError(f"option languages: a list of languages, got {languages!r}")
            names = tuple(languages)
            for name in names:
                _known_language("languages", name)
            object.__setattr__(self, "languages", names)
        if not isinstance(self.executables, Mapping):
            raise BackendOptionError(
                f"option executables: a mapping of language to path, got {self.executables!r}"
            )
        for name, path in self.executables.items():
            _known_language("executables", name)
            if not isinstance(path, str) or not os.path.isabs(path):
                raise BackendOptionError(f"option executables: {name} needs an absolute path, got {path!r}")
        if not isinstance(self.default_limits, Limits):
            raise BackendOptionError(f"option default_limits: a Limits, got {self.default_limits!r}")


def raise_option(name: str, expected: str, value: object) -> NoReturn:
    raise BackendOptionError(f"option {name}: expected {expected}, got {value!r}")


def _integer(options: object, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise_option(name, f"an integer of at least {minimum}", value)


def _number(options: object, name: str, zero_allowed: bool = False) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < math.inf):
        raise_option(name, "a positive number", value)
    if value == 0 and not zero_allowed:
        raise_option(name, "a positive number", value)


def _known_language(option: str, name: object) -> None:
    if name not in LANGUAGES:
        raise BackendOptionError(f"option {option}: unknown language {name!r}; known: {', '.join(LANGUAGES)}")


@dataclass(eq=False)
class HostSandbox:
    """One started sandbox: the profile it was started for and its outer process."""

    profile: Hashable
    process: SandboxProcess
    disposed: bool = field(default=False, repr=False)


OptionsT = TypeVar("OptionsT", bound=BackendOptions)
SandboxT = TypeVar("SandboxT", bound=HostSandbox)


class HostBackend(ABC, Generic[OptionsT, SandboxT]):
    """The shared life of a host backend; subclasses implement the methods marked "backend"."""

    name: str
    options_type: ClassVar[type[BackendOptions]]

    def __init__(self, options: OptionsT) -> None:
        if not hasattr(os, "pidfd_open"):
            raise SandboxUnavailable(f"the {self.name} backend needs Linux 5.3 or later (pidfd_open)")
        self.options = options
        if options.max_concurrent is None:
            capacity = host_capacity(options.default_limits, options.runs_per_core, options.host_sharers)
            self.max_concurrent = capacity.slots
            sizing = capacity.describe()
        else:
            self.max_concurrent = options.max_concurrent
            sizing = f"{self.max_concurrent} runs at once (configured)"
        self._admission = Admission(
            self.max_concurrent,
            options.max_runs_per_user or math.ceil(self.max_concurrent / 2),
            options.max_queue_seconds,
            options.max_waiting_per_user,
        )
        log.info(
            "%s sandbox admission: %s; %d per user; waiting up to %g s",
            self.name,
            sizing,
            self._admission.per_user,
            options.max_queue_seconds,
        )
        # RLIMIT_CPU is a backstop behind the wall-clock timeout: fixed when a sandbox starts, at
        # the longest timeout, then lowered to the run's own when its payload arrives.
        self._cpu_ceiling = math.ceil(options.max_timeout_seconds) + 1
        self._runtime_dir = Path(tempfile.mkdtemp(prefix=f"pythonon-{self.name}-"))
        self._runtime_dir.chmod(0o755)  # the sandbox's uid must reach what is mounted from here
        leftovers.mark_owner(self._runtime_dir)  # so that a successor can tell it was left behind
        wanted = frozenset(options.languages) if options.languages is not None else None
        try:
            self._runtimes, self.unavailable = discover(self._runtime_dir, options.executables, wanted)
        except BaseException:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            raise
        self._pool: WarmPool[Hashable, SandboxT] = WarmPool(
            options.pool_size, self._spawn, self._dispose, lambda sandbox: sandbox.process.exited
        )
        self._live: set[SandboxT] = set()
        self._disposals: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = False

    # -- the contract ---------------------------------------------------------------------------

    def languages(self) -> list[str]:
        return [name for name in LANGUAGES if name in self._runtimes]

    async def start(self) -> None:
        """Run each language's smoke test in a sandbox of its own; drop, with a warning, a language
        that fails (raise SandboxUnavailable when all do); then keep each language's pool warm."""
        if self._started:
            return
        self._started = True
        failures: dict[str, str] = {}

        async def check(language: str) -> None:
            try:
                sandbox = await self._spawn(self._default_profile(language))
                try:
                    result = await self._execute(sandbox, RunSpec(language, LANGUAGES[language].smoke_test))
                finally:
                    self._dispose(sandbox)
            except SandboxError as error:
                failures[language] = str(error)
                return
            if result.stdout != SMOKE_TEST_OUTPUT:
                failures[language] = result.stderr.strip() or f"exit status {result.exit_code}"

        await asyncio.gather(*(check(language) for language in self.languages()))
        for language, reason in failures.items():
            log.warning("%s sandbox for %s cannot start: %s", self.name, language, reason)
            self.unavailable[language] = reason
            del self._runtimes[language]
        if not self._runtimes:
            await self.close()
            raise SandboxUnavailable(
                f"no {self.name} sandbox can start here: "
                + "; ".join(f"{k}: {v}" for k, v in failures.items())
            )
        # Filled in the background: the executor serves at once (a run that finds no warm sandbox
        # starts its own), so that a restarted executor answers again sooner.
        self._pool.keep_warm(self._default_profile(language) for language in self.languages())

    async def run(self, spec: RunSpec, on_output: OutputListener | None = None) -> RunResult:
        validate_spec(spec, {name: runtime.main_file for name, runtime in self._runtimes.items()})
        if self._closed:
            raise SandboxError("the sandbox backend is closed")
        async with self._admission.slot(spec.owner):
            profile = self._profile(spec.language, spec.limits, spec.readonly_paths)
            sandbox = await self._pool.take_or_wait(profile)
            if sandbox is None:
                log.debug("no warm sandbox for this run's profile; starting one")
                sandbox = await self._spawn(profile)
            try:
                return await self._execute(sandbox, spec, on_output)
            finally:
                self._dispose(sandbox)
                if spec.readonly_paths:
                    self._keep_recent_warm(profile)

    def replenish(self) -> None:
        """Refill the warm pool that runs have drawn from (starting a sandbox costs the executor's
        event loop a few milliseconds, and the new sandbox a core for a while)."""
        self._pool.replenish()

    async def close(self) -> None:
        self._closed = True
        await self._pool.close()
        for sandbox in list(self._live):
            self._dispose(sandbox)
        if self._disposals:
            await asyncio.gather(*list(self._disposals), return_exceptions=True)
        await self._close_host()
        shutil.rmtree(self._runtime_dir, ignore_errors=True)

    # -- shared parts ---------------------------------------------------------------------------

    def _keep_recent_warm(self, profile: Hashable) -> None:
        """Keep a warm pool for each of the RECENT_MOUNT_PROFILES profiles with read-only mounts (a
        user's package environment) used last, so that a run with packages starts warm too."""
        if not self._closed:
            # As deep as a language's pool (one user's back-to-back runs wait for the refill's
            # start under way, and have one more started: warm_pool.take_or_wait).
            self._pool.keep_recently_used(profile, RECENT_MOUNT_PROFILES)

    def _default_profile(self, language: str) -> Hashable:
        return self._profile(language, self.options.default_limits, ())

    def _track(self, sandbox: SandboxT) -> SandboxT:
        """Count a sandbox as live from the moment its process exists, so that close finds it."""
        self._live.add(sandbox)
        return sandbox

    def _dispose(self, sandbox: SandboxT) -> None:
        """Kill the sandbox now and, in the background, reap it and release what it holds."""
        if sandbox.disposed:
            return
        sandbox.disposed = True
        self._kill(sandbox)
        task = asyncio.get_running_loop().create_task(self._finish_disposal(sandbox))
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def _finish_disposal(self, sandbox: SandboxT) -> None:
        try:
            await self._release(sandbox)
        finally:
            self._live.discard(sandbox)

    def _result(self, limits: Limits, outcome: Outcome, out_of_memory: bool) -> RunResult:
        return result_of(
            limits,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            exit_code=outcome.exit_code,
            duration_seconds=outcome.duration_seconds,
            timed_out=outcome.timed_out,
            overflowed=outcome.overflowed,
            memory_note=f"memory limit of {describe_bytes(limits.memory_bytes)} exceeded"
            if out_of_memory
            else None,
        )

    def _runtime(self, language: str) -> Runtime:
        return self._runtimes[language]

    def _write_etc(self, users: Iterable[tuple[str, int]]) -> Path:
        """The sandbox's /etc (passwd, group, hosts, nsswitch.conf) under the runtime directory,
        readable by any uid whatever the service's umask (the runner's is 077): `users` are
        (name, uid) pairs besides root and nobody, each with a group of the same id."""
        etc = self._runtime_dir / "etc"
        etc.mkdir(exist_ok=True)
        etc.chmod(0o755)
        passwd = [
            "root:x:0:0:root:/root:/usr/sbin/nologin",
            f"nobody:x:{NOBODY}:{NOBODY}:nobody:{WORKDIR}:/bin/sh",
        ]
        group = ["root:x:0:", f"nogroup:x:{NOBODY}:"]
        for name, uid in users:
            passwd.append(f"{name}:x:{uid}:{uid}:{name}:{WORKDIR}:/bin/sh")
            group.append(f"{name}:x:{uid}:")
        files = {
            "passwd": "\n".join(passwd) + "\n",
            "group": "\n".join(group) + "\n",
            "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        }
        for name, content in files.items():
            (etc / name).write_text(content)
            (etc / name).chmod(0o644)
        return etc

    # -- what each backend says -----------------------------------------------------------------

    @abstractmethod
    def enforced_limits(self) -> dict[str, bool]:
        """Which limits this host actually enforces (for /api/info)."""

    @abstractmethod
    def _profile(self, language: str, limits: Limits, readonly_paths: Iterable[tuple[str, str]]) -> Hashable:
        """What must be fixed when a sandbox starts; runs with equal profiles share a pool."""

    @abstractmethod
    async def _spawn(self, profile: Any) -> SandboxT:
        """Start a sandbox for `profile` and return it once its bootstrap waits for a payload;
        SandboxError when it cannot. Registers it with `_track` as soon as its process exists."""

    @abstractmethod
    async def _execute(
        self, sandbox: SandboxT, spec: RunSpec, on_output: OutputListener | None = None
    ) -> RunResult:
        """Send the run's payload to a started sandbox and answer what the program did, telling
        `on_output` the output as it comes."""

    @abstractmethod
    def _kill(self, sandbox: SandboxT) -> None:
        """Kill every process of the sandbox, now."""

    @abstractmethod
    async def _release(self, sandbox: SandboxT) -> None:
        """After `_kill`: wait for the sandbox to be gone and free what it held."""

    async def _close_host(self) -> None:
        """Release what the backend holds besides its sandboxes and runtime directory."""
