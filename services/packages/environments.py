"""Package environments on disk: content-addressed, immutable once built, and built with `uv`
from wheels only, so that no package code runs on the host.

Layout of the store (a directory the executor can read):
- `environments/<key>/<instance>/`: one environment's importable files, read-only for everyone once
  built, `key` the hash of its lock, the interpreter's version and the platform (equal locks share
  one). `instance` is random per build: an environment collected and later built again gets a new
  path, so a warm sandbox that still mounts the old one (emptied) is never taken for the new one.
- `environments/<key>/lock.txt`: the lock it was installed from (exact versions and hashes).
- `users/<digest of the user id>`: present while the user's list is not empty, holding the key of
  the set the list makes (package_store.user_markers). The executor reads it before asking this
  service anything, so that a run of a user without packages costs what it cost before packages
  existed, and one whose environment it was answered for under that key costs no call either.
- `building/`: environments being installed (renamed into `environments/` when complete).
- `cache/`: uv's download cache (wheels only, verified against the lock's hashes), and in
  `cache/bytecode-v1/` each installed distribution's compiled files, keyed by its RECORD (the hash
  of every file it installed), the interpreter's version and the platform: a later environment
  that installs the same distribution links them instead of compiling again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.packages.source_builds import (
    MAX_SOURCE_BUILDS,
    SourceBuilder,
    SourceBuildFailed,
    needs_source_build,
)
from services.platform.package_store import ENVIRONMENTS, user_markers
from services.platform.service_graph import PACKAGE_INDEX_VARIABLES

log = logging.getLogger("pythonon.packages.environments")

LOCK_FILE = "lock.txt"
# The most of an installer's message kept as a build's reason (the first lines say what failed).
MAX_REASON_CHARACTERS = 600
BYTECODE_CACHE = "bytecode-v1"
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


class BuildFailed(Exception):
    """A build that cannot succeed as asked; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Target:
    """What environments are built for: the sandbox's interpreter, its version and platform."""

    python: str
    version: str  # e.g. "3.11.7"
    platform: str  # e.g. "linux-x86_64"

    @classmethod
    def probe(cls, python: str) -> Target:
        """Ask the interpreter itself (the sandbox runs it, so its answer is the one that counts)."""
        script = "import sys, sysconfig; print(sys.version.split()[0]); print(sysconfig.get_platform())"
        out = subprocess.run(
            [python, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        return cls(python=python, version=out[0], platform=out[1])

    def describe(self) -> str:
        return f"python {self.version} {self.platform}"


@dataclass(frozen=True)
class Lock:
    """A resolved requirement set: the lock's text (pins and hashes) and what it pins."""

    text: str
    versions: dict[str, str]
    # Directories of wheels built from source in the sandbox that the lock names (by their hashes).
    find_links: tuple[str, ...] = ()

    def environment_key(self, target: Target) -> str:
        digest = hashlib.sha256(self.text.encode()).hexdigest()
        return hashlib.sha256(f"{digest}\n{target.version}\n{target.platform}".encode()).hexdigest()


@dataclass(frozen=True)
class BuildLimits:
    max_bytes: int
    max_seconds: float


@dataclass(frozen=True)
class Installer:
    """How to run uv: its executable, the index (None: uv's default, the public index) and the
    store's download cache."""

    uv: str
    index_url: str | None
    cache_dir: Path
    # None: sdists are refused. Otherwise they are built into wheels in the sandbox (source_builds).
    source_builder: SourceBuilder | None = None

    def _command(self, *arguments: str, find_links: Iterable[str] = ()) -> list[str]:
        # --only-binary always: uv itself never builds (runs) a package on the host.
        command = [self.uv, "pip", *arguments, "--no-config", "--only-binary", ":all:"]
        if self.index_url:
            command += ["--index-url", self.index_url]
        for directory in find_links:
            command += ["--find-links", directory]
        return command

    def _environment(self) -> dict[str, str]:
        # Only what uv needs: no credentials of the service's own environment leak in by accident,
        # and no UV_* variable steers it but the trust store's switch. The proxy and CA variables
        # are the operator's (service_graph.PACKAGE_INDEX_VARIABLES, which the runner passes on).
        keep = ("PATH", "HOME", "LANG", *PACKAGE_INDEX_VARIABLES)
        env = {name: os.environ[name] for name in keep if name in os.environ}
        env["UV_CACHE_DIR"] = str(self.cache_dir)
        env["UV_NO_PROGRESS"] = "1"
        return env

    async def warm_up(self, target: Target) -> None:
        """Have uv learn the target interpreter now, at the service's start: uv keeps what it asked
        the interpreter (its markers and tags, ~0.16 s on this machine) in its cache, so that the
        first build after the start, or after the cache was emptied, does not wait for it. A
        failure here is no failure: the build asks again and reports what it finds."""
        loop = asyncio.get_running_loop()
        command = [self.uv, "python", "find", "--no-config", target.python]
        try:
            _out, err, code = await _run(command, self._environment(), None, loop.time() + 30)
        except BuildFailed:
            code, err = 1, "it took longer than 30 s"
        if code != 0:
            log.warning("uv could not query the interpreter %s: %s", target.python, _reason(err))

    async def resolve(self, requirements: list[str], target: Target, deadline: float) -> Lock:
        """The lock of `requirements` (exact versions, every wheel's hash), or BuildFailed with the
        resolver's own words (which package, which version, why). With source builds on, a package
        found only as an sdist is built into a wheel in the sandbox and the set resolved again."""
        find_links: list[str] = []
        built: set[tuple[str, str]] = set()
        while True:
            command = self._command(
                "compile", "-", "--generate-hashes", "--no-header", "--no-annotate", "--quiet",
                "--python", target.python, find_links=find_links,
            )  # fmt: skip
            out, err, code = await _run(
                command, self._environment(), "\n".join(requirements) + "\n", deadline
            )
            if code == 0:
                versions = {_canonical(name): version for name, version in _PINNED.findall(out)}
                return Lock(text=out, versions=versions, find_links=tuple(find_links))
            wanted = needs_source_build(err) if self.source_builder is not None else None
            if self.source_builder is None or wanted is None:
                raise BuildFailed(_reason(err) or "the requirements could not be resolved")
            if wanted in built:  # built, yet the resolver still has no wheel for it
                raise BuildFailed(
                    f"the wheel built from the source of {wanted[0]}=={wanted[1]} does not fit {target.describe()}"
                )
            if len(built) >= MAX_SOURCE_BUILDS:
                raise BuildFailed(
                    f"more than {MAX_SOURCE_BUILDS} packages of the set need building from source"
                )
            built.add(wanted)
            try:
                directory = await self.source_builder.build(
                    *wanted, functools.partial(self._install_build_requirements_for, target), deadline
                )
            except SourceBuildFailed as failure:
                raise BuildFailed(f"{wanted[0]}=={wanted[1]}: {failure}") from None
            find_links.append(str(directory))

    async def _install_build_requirements_for(
        self, target: Target, requirements: list[str], into: Path, deadline: float
    ) -> None:
        """A source build's requirements, from wheels only, into `into` (mounted in its sandbox)."""
        command = self._command("install", "--target", str(into), "--python", target.python, *requirements)
        _out, err, code = await _run(command, self._environment(), None, deadline)
        if code != 0:
            raise SourceBuildFailed(
                "its build requirements could not be installed: "
                + _reason(err, "a build's own requirements are installed from wheels only")
            )

    async def install(
        self,
        lock: Lock,
        into: Path,
        target: Target,
        deadline: float,
        on_progress: Callable[[int], None],
        check: Callable[[], None],
    ) -> None:
        """Install exactly the lock into `into` (created), from wheels only, bytecode compiled.
        `on_progress` hears how many packages are in place; `check` runs about once a second and
        stops the install by raising (e.g. BuildFailed past the size cap)."""
        lock_file = into.parent / LOCK_FILE
        lock_file.write_text(lock.text)
        command = self._command(
            "install", "--target", str(into), "--require-hashes", "--no-deps",
            "--python", target.python, "-r", str(lock_file), find_links=lock.find_links,
        )  # fmt: skip

        async def watch() -> None:
            tick = 0
            while True:
                await asyncio.sleep(0.2)
                tick += 1
                on_progress(_installed_count(into))
                if tick % 5 == 0:
                    check()

        installing = asyncio.ensure_future(_run(command, self._environment(), None, deadline))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((installing, watcher), return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                watcher.result()  # raises what the check found (e.g. the size cap)
            _out, err, code = installing.result()
        finally:
            for task in (installing, watcher):
                task.cancel()
            await asyncio.gather(installing, watcher, return_exceptions=True)
        if code != 0:
            raise BuildFailed(_reason(err) or "the packages could not be installed")
        await self._compile(into, target, deadline)
        on_progress(_installed_count(into))

    @property
    def bytecode_cache(self) -> Path:
        return self.cache_dir / BYTECODE_CACHE

    async def _compile(self, site: Path, target: Target, deadline: float) -> None:
        """Compiled files for every module installed in `site` (the mount is read-only, and an
        import without them compiles again in every run): each distribution's from the bytecode
        cache when an earlier build compiled it, else compiled now, by the sandbox's interpreter,
        and kept there. Hash-based and unchecked: the files never change once installed."""
        missing: dict[Path, list[str]] = {}
        for dist_info in sorted(site.glob("*.dist-info")):
            try:
                record = (dist_info / "RECORD").read_bytes()
            except OSError:
                continue
            sources = _recorded_sources(site, record)
            if not sources:
                continue
            cached = self.bytecode_cache / _bytecode_key(dist_info.name, record, target)
            if cached.is_dir():
                _link_tree(cached, site)
            else:
                missing[cached] = sources
        if not missing:
            return
        files = [site / source for sources in missing.values() for source in sources]
        env = {"PATH": os.environ.get("PATH", "")}
        # A module that does not compile (e.g. a test file of another Python) stays without; the
        # run then sees the same SyntaxError it would anyway.
        command = [target.python, "-I", "-S", str(_COMPILE_SOURCES)]
        await asyncio.gather(
            *(
                _run(command, env, "\n".join(map(str, share)) + "\n", deadline)
                for share in _shares(files, _COMPILERS)
            )
        )
        self.bytecode_cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        for cached, sources in missing.items():
            _keep_compiled(site, sources, cached)


class EnvironmentStore:
    """The store's directories, its environments and the users' markers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.environments = root / ENVIRONMENTS
        self.markers = user_markers(root)
        self.building = root / "building"
        self.cache = root / "cache"
        for directory in (root, self.environments, self.markers.directory):
            directory.mkdir(parents=True, exist_ok=True)
            # The executor (and, through a mount, the sandbox's uid) reads these whatever the umask.
            directory.chmod(0o755)
        for directory in (self.building, self.cache):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
        # An install interrupted by a stop left a half-made environment: never used, removed now.
        for leftover in self.building.iterdir():
            _remove_tree(leftover)

    def path(self, key: str) -> Path:
        """The importable directory of environment `key` (what the executor mounts)."""
        try:
            instance = next(
                entry.name for entry in os.scandir(self.environments / key) if entry.name.startswith("i-")
            )
        except (FileNotFoundError, StopIteration):
            return self.environments / key / "missing"
        return self.environments / key / instance

    def exists(self, key: str) -> bool:
        return self.path(key).is_dir()

    def keys(self) -> list[str]:
        return [entry.name for entry in self.environments.iterdir() if entry.is_dir()]

    async def build(
        self,
        installer: Installer,
        lock: Lock,
        target: Target,
        limits: BuildLimits,
        deadline: float,
        on_progress: Callable[[int], None],
    ) -> str:
        """Make the environment of `lock` unless it exists; returns its key. Installed in
        `building/`, checked against the size cap, made read-only, then renamed into place, so a
        reader never sees a half-made environment."""
        key = lock.environment_key(target)
        if self.exists(key):
            on_progress(len(lock.versions))
            return key
        work = Path(tempfile.mkdtemp(prefix=f"{key[:16]}-", dir=self.building))
        try:
            site = work / f"i-{secrets.token_hex(8)}"

            def check_size() -> None:
                if _tree_size(site) > limits.max_bytes:
                    raise BuildFailed(_too_large(limits))

            await installer.install(lock, site, target, deadline, on_progress, check_size)
            check_size()
            (work / "environment.json").write_text(
                json.dumps({"python": target.version, "platform": target.platform, "versions": lock.versions})
            )
            _make_read_only(work)
            try:
                work.rename(self.environments / key)
            except OSError:
                if not self.exists(key):  # another build of an equal lock got there first: use its
                    raise
            return key
        finally:
            if work.exists():
                _remove_tree(work)

    def remove(self, key: str) -> None:
        directory = self.environments / key
        if directory.exists():
            # Renamed away first, so that the executor never mounts a half-removed environment.
            doomed = Path(tempfile.mkdtemp(prefix="removing-", dir=self.building))
            directory.rename(doomed / key)
            _remove_tree(doomed)

    def prune_bytecode(self) -> int:
        """Remove the bytecode cache's entries that no environment links any more (each of their
        files has no other link); returns how many."""
        cache = self.cache / BYTECODE_CACHE
        removed = 0
        for entry in cache.iterdir() if cache.is_dir() else ():
            linked = any(
                os.lstat(os.path.join(directory, name)).st_nlink > 1
                for directory, _dirs, files in os.walk(entry)
                for name in files
            )
            if not linked:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def pinned(self) -> set[tuple[str, str]]:
        """Every (canonical name, version) that the lock of an environment on disk pins."""
        pins: set[tuple[str, str]] = set()
        for lock_file in self.environments.glob(f"*/{LOCK_FILE}"):
            with contextlib.suppress(OSError):
                pins.update(
                    (_canonical(name), version) for name, version in _PINNED.findall(lock_file.read_text())
                )
        return pins

    def size(self, key: str) -> int:
        return _tree_size(self.environments / key)

    # -- the users' markers ---------------------------------------------------------------------

    def mark(self, user_id: str, set_key: str | None) -> None:
        """Mark the user with the key of the set their list makes (None: an empty list, unmarked),
        so that the executor can keep the environment it was answered for while the key holds."""
        if set_key is None:
            self.markers.unmark(user_id)
        else:
            self.markers.mark(user_id, set_key)

    def reconcile_markers(self, set_keys: dict[str, str]) -> None:
        """Exactly the given users marked, each with its set's key (at start-up: the database is
        the truth)."""
        self.markers.reconcile(set_keys)


async def _run(
    command: list[str], env: dict[str, str], stdin: str | None, deadline: float
) -> tuple[str, str, int]:
    """Run `command` in a process group of its own; kill the group at the deadline (BuildFailed)
    or when the caller is cancelled."""
    loop = asyncio.get_running_loop()
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None),
            timeout=max(0.0, deadline - loop.time()),
        )
    except TimeoutError:
        _kill_group(process)
        await process.wait()
        raise BuildFailed("the build took longer than its time limit") from None
    except BaseException:
        _kill_group(process)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(process.wait())
        raise
    return out.decode(errors="replace"), err.decode(errors="replace"), process.returncode or 0


# The script the sandbox's interpreter compiles an environment's modules with (compileall's
# output, without its imports and its second read of each file).
_COMPILE_SOURCES = Path(__file__).with_name("compile_sources.py")
# Compiling processes at once: one per core (compileall's own -j0 starts a process pool whose
# import and start-up cost more than it saves for a set like requests'). Below ~256 KiB of source
# a second interpreter's start-up (~60 ms) is not worth it.
_COMPILERS = max(1, len(os.sched_getaffinity(0)))
_SHARE_BYTES = 256 * 1024


def _shares(files: list[Path], most: int) -> list[list[Path]]:
    """`files` split into at most `most` lists of about equal total size (largest first, each to the
    lightest list), fewer when the whole is small; none empty."""
    sized = []
    for path in files:
        try:
            sized.append((path.stat().st_size, path))
        except OSError:
            continue
    count = max(1, min(most, sum(size for size, _ in sized) // _SHARE_BYTES, len(sized)))
    shares: list[list[Path]] = [[] for _ in range(count)]
    loads = [0] * count
    for size, path in sorted(sized, key=lambda item: item[0], reverse=True):
        lightest = loads.index(min(loads))
        shares[lightest].append(path)
        loads[lightest] += size
    return [share for share in shares if share]


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _reason(
    stderr: str, no_wheel_hint: str = "only wheels are installed: building packages from source is off"
) -> str:
    """The installer's message, without its colour codes and hints about flags the user cannot pass."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stderr).strip()
    lines = [
        line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("hint:")
    ]
    reason = " ".join(line.strip() for line in lines)
    reason = reason.replace("error: ", "", 1).replace(" cause: ", ": ", 1)
    if "has no usable wheels" in reason:
        reason += f" ({no_wheel_hint})"
    if len(reason) > MAX_REASON_CHARACTERS:
        reason = reason[: MAX_REASON_CHARACTERS - 3] + "..."
    return reason


def _too_large(limits: BuildLimits) -> str:
    return f"the environment is larger than its size limit of {limits.max_bytes // (1024 * 1024)} MiB"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_count(site: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(site) if entry.name.endswith(".dist-info"))
    except FileNotFoundError:
        return 0


def _recorded_sources(site: Path, record: bytes) -> list[str]:
    """The .py files a distribution installed inside `site` (its RECORD's paths, relative)."""
    sources = []
    for line in record.decode(errors="replace").splitlines():
        path = line.rsplit(",", 2)[0].strip('"')
        if path.endswith(".py") and ".." not in path.split("/") and not path.startswith("/"):
            if (site / path).is_file():
                sources.append(path)
    return sources


def _bytecode_key(dist_info_name: str, record: bytes, target: Target) -> str:
    text = f"{dist_info_name}\n{target.version}\n{target.platform}\n".encode()
    return hashlib.sha256(text + record).hexdigest()


def _compiled_of(site: Path, source: str) -> list[Path]:
    """The compiled files of `source` that the interpreter wrote (e.g. __pycache__/x.cpython-311.pyc)."""
    path = site / source
    return sorted((path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"))


def _keep_compiled(site: Path, sources: list[str], cached: Path) -> None:
    """Link the compiled files of `sources` into the bytecode cache entry `cached` (made whole in a
    scratch directory and renamed, so that a reader never sees half an entry)."""
    scratch = Path(tempfile.mkdtemp(prefix="partial-", dir=cached.parent))
    try:
        for source in sources:
            for compiled in _compiled_of(site, source):
                relative = compiled.relative_to(site)
                (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
                _link(compiled, scratch / relative)
        try:
            scratch.rename(cached)
        except OSError:
            if not cached.is_dir():  # an equal build kept the same entry first: keep that one
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _link_tree(cached: Path, site: Path) -> None:
    """Hard links in `site` to every file of the cache entry (a copy across file systems)."""
    for directory, _dirs, files in os.walk(cached):
        inside = site / Path(directory).relative_to(cached)
        inside.mkdir(parents=True, exist_ok=True)
        for name in files:
            with contextlib.suppress(FileExistsError):
                _link(Path(directory, name), inside / name)


def _link(source: Path, link: Path) -> None:
    """A hard link, or a copy where the file systems differ."""
    try:
        os.link(source, link)
    except FileExistsError:
        raise
    except OSError:
        shutil.copyfile(source, link)


def _tree_size(root: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def _make_read_only(root: Path) -> None:
    """Directories r-x and files r-- for everyone (the sandbox's uid reads them through the mount;
    nothing, not even this service, writes them again)."""
    for directory, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                mode = os.lstat(path).st_mode
                os.chmod(path, 0o555 if mode & 0o111 else 0o444)
        for name in dirs:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)  # noqa: S103 - read-only; the sandbox's uid must traverse it
    os.chmod(root, 0o555)  # noqa: S103 - as above


def _remove_tree(root: Path) -> None:
    def writable(function: Callable[..., object], path: str, _error: object) -> None:
        os.chmod(os.path.dirname(path), 0o700)
        with contextlib.suppress(IsADirectoryError, PermissionError):
            os.chmod(path, 0o700)
        function(path)

    with contextlib.suppress(FileNotFoundError):
        for directory, dirs, _files in os.walk(root):
            os.chmod(directory, 0o700)
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(directory, name), 0o700)
        shutil.rmtree(root, onerror=writable)
