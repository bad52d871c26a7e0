"""Building a wheel from a source distribution, inside the sandbox, when the operator allows it.

uv never builds anything on the host (it always runs with `--only-binary :all:`). When a set needs a
package that ships only an sdist, the resolver says so ("x==1.0 has no usable wheels"); then, with
source builds on:

1. the host downloads the sdist from the index's simple page and checks the page's sha256 (bytes
   only: nothing of the package runs), reads its `pyproject.toml` to learn its build backend and
   build requirements, and installs those requirements, from wheels only, into a build environment
   of their own (cached in the store by their list);
2. a sandbox of the executor's sandbox library (bubblewrap: no network, its own uid, memory,
   processes, time and disk limits; the build environment mounted read-only) unpacks the sdist in its
   working directory, calls the backend's `build_wheel` and writes the wheel, base64, on its stdout;
3. the host checks that the wheel is named for the package and version asked for, and keeps it in
   `built/<sha256 of the sdist>/`; the resolver is asked again with that directory as a find-links
   location, so the wheel is locked by its hash and installed like any other.

Built wheels are kept while an environment's lock pins them: the same sdist is built once, and the
collection of unused environments also removes the wheels no remaining lock pins (`prune`), and
the build environments no build has used for BUILD_ENVIRONMENT_KEEP_SECONDS.
Compilers are not in the sandbox, so packages with C extensions do not build (their reason says
what the build printed)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import html.parser
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from services.executor.sandbox import Limits, RunSpec, SandboxBackend, SandboxError

log = logging.getLogger("pythonon.packages.source_builds")

# Where the build environment is mounted in the sandbox.
BUILD_ENVIRONMENT_MOUNT = "/opt/pythonon/build-env"
SDIST_FILE = "sdist.tar.gz"
# Prefix of what is being made; never a sha256 (the names of what is complete).
UNFINISHED = "unfinished-"
# How long a build environment (a list of build requirements, installed) is kept after its last use.
BUILD_ENVIRONMENT_KEEP_SECONDS = 7 * 24 * 3600
# PEP 517's fallback for an sdist without [build-system].
LEGACY_REQUIRES = ("setuptools>=40.8.0",)
LEGACY_BACKEND = "setuptools.build_meta:__legacy__"
WHEEL_MARKER = "PYTHONON-WHEEL "
# More than this many sdists in one set: the set is refused (each is a build of its own).
MAX_SOURCE_BUILDS = 10
_NO_WHEELS = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?) has no usable wheels")
_DEFAULT_INDEX = re.compile(r"by default: <(https?://[^>]+)>")

# Runs in the sandbox: unpack, build with the backend, answer the wheel on stdout. The backend's
# own output goes to stderr, so that nothing it prints is taken for the wheel.
BUILD_SCRIPT = """\
import base64, importlib, os, sys, tarfile
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
with tarfile.open("sdist.tar.gz") as archive:
    archive.extractall("src", filter="data")
(top,) = os.listdir("src")
source = os.path.join(os.getcwd(), "src", top)
os.chdir(source)
backend_name, backend_path = sys.argv[1], sys.argv[2:]
sys.path[:0] = [os.path.join(source, path) for path in backend_path]
module, _, attribute = backend_name.partition(":")
backend = importlib.import_module(module)
for part in filter(None, attribute.split(".")):
    backend = getattr(backend, part)
os.mkdir("/tmp/wheel")
name = backend.build_wheel("/tmp/wheel")
with open(os.path.join("/tmp/wheel", name), "rb") as wheel:
    out.write("PYTHONON-WHEEL " + name + "\\n" + base64.b64encode(wheel.read()).decode() + "\\n")
out.flush()
"""


# Installs a build's requirements (wheels only) into a directory, by a deadline: the Installer's uv.
InstallBuildRequirements = Callable[[list[str], Path, float], Awaitable[None]]


class SourceBuildFailed(Exception):
    """The sdist could not be fetched or built; the message is the reason shown to the user."""


@dataclass(frozen=True)
class SourceBuildLimits:
    seconds: float  # at most; the build's own deadline may leave less
    memory_bytes: int
    disk_bytes: int  # the sandbox's working directory and /tmp, each; and the wheel's size


def needs_source_build(resolver_message: str) -> tuple[str, str] | None:
    """(name, version) of the package the resolver found only an sdist for, if that is why it failed."""
    found = _NO_WHEELS.search(resolver_message)
    return (found.group(1), found.group(2)) if found else None


def default_index(uv: str) -> str | None:
    """The index uv uses when none is configured, as uv itself states it (so the host fetches an
    sdist from the index the resolver read)."""
    try:
        text = subprocess.run(
            [uv, "pip", "compile", "--help"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _DEFAULT_INDEX.search(text)
    return found.group(1) if found else None


class SourceBuilder:
    """Builds wheels from sdists in `sandbox` (a started python sandbox backend); keeps them and the
    build environments under `root`."""

    def __init__(
        self,
        sandbox: SandboxBackend,
        root: Path,
        index_url: str,
        limits: SourceBuildLimits,
    ) -> None:
        self._sandbox = sandbox
        self._built = root / "built"
        self._build_environments = root / "build-environments"
        self._index_url = index_url.rstrip("/")
        self._limits = limits
        for directory in (self._built, self._build_environments):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
            # What a build interrupted by a stop was making (renamed into place only when complete).
            for leftover in directory.glob(f"{UNFINISHED}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        # httpx logs every URL at INFO, and an index URL may hold the operator's credentials.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # One build of a given sdist at a time (two sets may need it at once).
        self._locks: dict[str, asyncio.Lock] = {}

    async def build(
        self, name: str, version: str, install_build_requirements: InstallBuildRequirements, deadline: float
    ) -> Path:
        """The directory holding the wheel of `name==version` built from its sdist (built now unless
        it was before); SourceBuildFailed with the reason."""
        url, sha256 = await self._find_sdist(name, version)
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            directory = self._built / sha256
            if directory.is_dir() and any(directory.glob("*.whl")):
                return directory
            sdist = await self._download(url, sha256)
            requires, backend, backend_path = _build_system(sdist, name)
            build_environment = await self._build_environment(requires, install_build_requirements, deadline)
            wheel_name, wheel = await self._build_in_sandbox(
                sdist, backend, backend_path, build_environment, deadline
            )
            _check_wheel(wheel_name, name, version)
            work = Path(tempfile.mkdtemp(prefix=UNFINISHED, dir=self._built))
            (work / wheel_name).write_bytes(wheel)
            work.rename(directory)
            log.info("built a wheel from source in the sandbox", extra={"package": canonicalize_name(name)})
            return directory

    def prune(self, pinned: set[tuple[str, str]], now: float | None = None) -> int:
        """Remove the built wheels that no (canonical name, version) in `pinned` names (each
        environment's lock pins what it installed), and the build environments unused for
        BUILD_ENVIRONMENT_KEEP_SECONDS before `now` (default: the time); returns how many
        directories went. Only while no build runs: a build may hold a wheel it has not locked yet."""
        stale_before = (time.time() if now is None else now) - BUILD_ENVIRONMENT_KEEP_SECONDS
        removed = 0
        for directory in self._build_environments.iterdir():
            if directory.is_dir() and not directory.name.startswith(UNFINISHED):
                if directory.stat().st_mtime < stale_before:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed += 1
        wanted = {(canonicalize_name(name), _normalized(version)) for name, version in pinned}
        for directory in self._built.iterdir():
            if directory.name.startswith(UNFINISHED) or not directory.is_dir():
                continue
            wheels = []
            for wheel in directory.glob("*.whl"):
                try:
                    name, version, _build, _tags = parse_wheel_filename(wheel.name)
                except InvalidWheelFilename:
                    continue
                wheels.append((name, version))
            if not any(wheel in wanted for wheel in wheels):
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        return removed

    async def _find_sdist(self, name: str, version: str) -> tuple[str, str]:
        page_url = f"{self._index_url}/{canonicalize_name(name)}/"
        try:
            async with httpx.AsyncClient(timeout=30, follow_redirects=True) as client:
                response = await client.get(page_url, headers={"Accept": "text/html"})
        except httpx.HTTPError as error:
            raise SourceBuildFailed(
                f"the index could not be read for {name}: {type(error).__name__}"
            ) from None
        if response.status_code != 200:
            raise SourceBuildFailed(f"the index answered {response.status_code} for {name}")
        wanted = f"{name.replace('-', '_')}-{version}.tar.gz".lower()
        for href in _links(response.text):
            url = urllib.parse.urljoin(str(response.url), href)
            path, _, fragment = url.partition("#")
            file_name = urllib.parse.unquote(path.rsplit("/", 1)[-1]).lower()
            if file_name.replace("-", "_").replace(".", "_") != wanted.replace("-", "_").replace(".", "_"):
                continue
            digest = urllib.parse.parse_qs(fragment).get("sha256", [""])[0]
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise SourceBuildFailed(f"the index gives no sha256 for the source of {name}=={version}")
            return path, digest
        raise SourceBuildFailed(f"the index has no source distribution (.tar.gz) of {name}=={version}")

    async def _download(self, url: str, sha256: str) -> bytes:
        """The sdist's bytes, read no further than the build's disk limit, checked against `sha256`."""
        content = bytearray()
        try:
            async with (
                httpx.AsyncClient(timeout=60, follow_redirects=True) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise SourceBuildFailed(
                        f"the index answered {response.status_code} for a source distribution"
                    )
                async for chunk in response.aiter_bytes():
                    content += chunk
                    if len(content) > self._limits.disk_bytes:
                        raise SourceBuildFailed(
                            "the source distribution is larger than the build's disk limit"
                        )
        except httpx.HTTPError as error:
            raise SourceBuildFailed(
                f"the source distribution could not be downloaded: {type(error).__name__}"
            ) from None
        if hashlib.sha256(content).hexdigest() != sha256:
            raise SourceBuildFailed("the source distribution does not match the index's sha256")
        return bytes(content)

    async def _build_environment(
        self, requires: list[str], install: InstallBuildRequirements, deadline: float
    ) -> Path | None:
        if not requires:
            return None
        key = hashlib.sha256(json.dumps(sorted(requires)).encode()).hexdigest()
        directory = self._build_environments / key
        if directory.is_dir():
            os.utime(directory)  # its last use, which `prune` goes by
            return directory
        work = Path(tempfile.mkdtemp(prefix=UNFINISHED, dir=self._build_environments))
        try:
            await install(requires, work / "site", deadline)
            # The sandbox's uid reads it through a read-only mount.
            for path in [work, *work.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            try:
                work.rename(directory)
            except OSError:
                if not directory.is_dir():  # else a build with the same requirements made it first
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return directory

    async def _build_in_sandbox(
        self,
        sdist: bytes,
        backend: str,
        backend_path: list[str],
        build_environment: Path | None,
        deadline: float,
    ) -> tuple[str, bytes]:
        loop = asyncio.get_running_loop()
        seconds = min(self._limits.seconds, deadline - loop.time())
        if seconds <= 1:
            raise SourceBuildFailed("the build took longer than its time limit")
        disk = self._limits.disk_bytes
        limits = Limits(
            timeout_seconds=seconds,
            memory_bytes=self._limits.memory_bytes,
            processes=256,
            # base64 makes the wheel a third larger; the marker line and the name fit in the rest
            output_bytes=disk * 4 // 3 + 4096,
            file_bytes=disk,
            tmp_bytes=disk,
            cpus=1.0,
        )
        mounts: tuple[tuple[str, str], ...] = ()
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        if build_environment is not None:
            mounts = ((str(build_environment / "site"), BUILD_ENVIRONMENT_MOUNT),)
            env["PYTHONPATH"] = BUILD_ENVIRONMENT_MOUNT
        # A JSON list of strings is a Python literal too.
        code = f"import sys\nsys.argv[1:] = {json.dumps([backend, *backend_path])}\n" + BUILD_SCRIPT
        spec = RunSpec(
            "python", code, env=env, limits=limits, files={SDIST_FILE: sdist}, readonly_paths=mounts,
            owner="source-builds",
        )  # fmt: skip
        try:
            result = await self._sandbox.run(spec)
        except (SandboxError, ValueError) as error:
            raise SourceBuildFailed(f"the build sandbox could not run: {error}") from None
        if result.timed_out:
            raise SourceBuildFailed("the build from source took longer than its time limit")
        marker = result.stdout.find(WHEEL_MARKER)
        if result.exit_code != 0 or marker < 0:
            raise SourceBuildFailed(f"building from source failed: {_last_lines(result.stderr)}")
        header, _, body = result.stdout[marker + len(WHEEL_MARKER) :].partition("\n")
        try:
            wheel = base64.b64decode(body.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise SourceBuildFailed("building from source gave no readable wheel") from None
        return header.strip(), wheel


def _build_system(sdist: bytes, name: str) -> tuple[list[str], str, list[str]]:
    """The sdist's build requirements, backend and backend path, read from its pyproject.toml (the
    host reads the archive's index and that one file; nothing is unpacked or run here)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.count("/") == 1]
            pyproject = next((m for m in members if m.name.endswith("/pyproject.toml")), None)
            text = archive.extractfile(pyproject).read().decode() if pyproject else ""  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, UnicodeDecodeError, EOFError):
        raise SourceBuildFailed(f"the source distribution of {name} is not a readable .tar.gz") from None
    try:
        build_system = tomllib.loads(text).get("build-system", {}) if text else {}
    except tomllib.TOMLDecodeError:
        raise SourceBuildFailed(f"the pyproject.toml of {name} is not valid TOML") from None
    if not isinstance(build_system, dict) or "build-backend" not in build_system:
        return list(LEGACY_REQUIRES), LEGACY_BACKEND, []
    requires = build_system.get("requires", [])
    backend = build_system["build-backend"]
    backend_path = build_system.get("backend-path", [])
    valid = (
        isinstance(requires, list)
        and all(isinstance(item, str) for item in requires)
        and isinstance(backend, str)
        and re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?", backend)
        and isinstance(backend_path, list)
        and all(
            isinstance(item, str) and not item.startswith("/") and ".." not in item for item in backend_path
        )
    )
    if not valid:
        raise SourceBuildFailed(f"the [build-system] table of {name} is not valid")
    return requires, backend, backend_path


def _normalized(version: str) -> Version | str:
    """Comparable as versions are (1.0 == 1.0.0), or the text as it is when it is none."""
    try:
        return Version(version)
    except InvalidVersion:
        return version


def _check_wheel(wheel_name: str, name: str, version: str) -> None:
    """The sandbox answers a wheel of the package and version asked for, or nothing is kept."""
    try:
        wheel_project, wheel_version, _build, _tags = parse_wheel_filename(wheel_name)
    except InvalidWheelFilename:
        raise SourceBuildFailed("building from source gave a file that is not a wheel") from None
    if wheel_project != canonicalize_name(name) or str(wheel_version) != version or "/" in wheel_name:
        raise SourceBuildFailed(f"building {name}=={version} from source gave a wheel of another package")


def _last_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-500:] or "no message"


def _links(page: str) -> list[str]:
    hrefs: list[str] = []

    class Anchors(html.parser.HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "a":
                hrefs.extend(value for key, value in attrs if key == "href" and value)

    Anchors().feed(page)
    return hrefs
