"""Package environments: `python -m bench.packages`. Not part of the test suite.

Measures, in one run on this machine:
- building a new ("cold") environment for `requests` with the packages service's own code (its
  settings, `Installer.resolve` then `EnvironmentStore.build`, as a build does, into a fresh store),
  once with the download cache the service keeps across all its builds (warmed by one earlier build:
  a new environment, not a new service) and once with an empty cache, against `pip install
  --target` of the same set, likewise once with pip's own cache kept (warmed by one earlier
  install) and once with it off, in a rotating order; the service's time is split into resolving
  and installing, and the ratios of the medians, like for like, are printed (target <= 0.3);
- through the sandbox layer (the warm pool kept per environment), the p50 of a run that imports a
  package from its environment (mounted read-only at the executor's path, on PYTHONPATH) against
  the p50 of a plain hello-world, and of a hello-world with the environment mounted (what the mount
  itself costs), the three interleaved; the ratios are printed (what the import itself costs in
  CPU, against a warm hello-world that costs almost nothing here);
- through the whole mesh (Envoy, the executor, the packages service's GetEnvironment, the warm
  sandbox), the p50 of a user's `import <package>` run against another user's plain hello-world,
  interleaved, once the first user's list is ready (`--skip-mesh` leaves this part out): the
  ratio a user sees (target <= 2.0).

Both need the package index (PYTHONON_PACKAGES_INDEX_URL, else the installer's default): when it
cannot be reached the benchmark says so and stops."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from bench.baseline import percentile
from services.executor.packages_client import RunPackages
from services.executor.sandbox import BACKENDS, LANGUAGES, RunSpec, create_backend
from services.packages.environments import BuildFailed, BuildLimits, EnvironmentStore, Installer, Target
from services.packages.settings import PackagesSettings
from services.platform.package_store import SANDBOX_MOUNT
from services.platform.settings import Environment
from services.runner.mesh import Mesh, MeshConfig

BUILD_SET = ["requests"]
# The service's own limits (defaults): a build past them would fail there too.
LIMITS = BuildLimits(max_bytes=1024 * 1024 * 1024, max_seconds=300.0)


class IndexUnreachable(Exception):
    """The package index could not be reached (or refused): nothing can be measured."""


def service_settings(store: Path) -> PackagesSettings:
    """The packages service's settings as it would load them here (index, interpreter, uv), with
    `store` as its directory. The database and audit addresses are required by the loader but
    never used: the benchmark calls the build code, not the service."""
    environ = {
        **os.environ,
        "PYTHONON_PACKAGES_DIR": str(store),
        "PYTHONON_DATABASE_URL": "sqlite://",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:1",
    }
    return PackagesSettings.load(Environment(environ))


@dataclass(frozen=True)
class BuildTimes:
    """Where a build's time went: resolving to a lock, then installing it (download, unpack,
    bytecode compilation, the size check and the read-only pass)."""

    resolve: float
    install: float

    @property
    def total(self) -> float:
        return self.resolve + self.install


async def service_build(
    store_dir: Path, requirements: list[str], cache: Path | None = None
) -> tuple[BuildTimes, Path]:
    """Times to resolve and build `requirements` into a new environment of a fresh store, as the
    service's build does, and the environment's importable directory (what the executor mounts).
    `cache`: uv's download cache to use (the service keeps one for all its builds); None: the new
    store's own, empty."""
    settings = service_settings(store_dir)
    target = Target.probe(settings.python)
    store = EnvironmentStore(settings.store)
    installer = Installer(uv=settings.uv, index_url=settings.index_url, cache_dir=cache or store.cache)
    await installer.warm_up(target)  # the service does it at its start
    deadline = asyncio.get_running_loop().time() + LIMITS.max_seconds
    try:
        started = time.perf_counter()
        lock = await installer.resolve(requirements, target, deadline)
        resolved = time.perf_counter()
        key = await store.build(installer, lock, target, LIMITS, deadline, lambda _count: None)
        built = time.perf_counter()
    except BuildFailed as failure:
        raise IndexUnreachable(str(failure)) from None
    return BuildTimes(resolved - started, built - resolved), store.path(key)


def pip_install_seconds(into: Path, requirements: list[str], cache: Path | None = None) -> float:
    """Seconds for `pip install --target` of `requirements`, with pip's cache in `cache` (None: off).
    `--isolated`: pip ignores this machine's configuration (extra find-links, ...), as the service's
    uv does with --no-config, so both ask the same index for the same files."""
    caching = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache-dir"]
    command = [
        sys.executable, "-m", "pip", "--isolated", "install", "--quiet", "--disable-pip-version-check",
        *caching, "--target", str(into), *requirements,
    ]  # fmt: skip
    index_url = os.environ.get("PYTHONON_PACKAGES_INDEX_URL")
    if index_url:
        command += ["--index-url", index_url]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise IndexUnreachable(finished.stderr.strip().splitlines()[-1] if finished.stderr else "pip failed")
    return time.perf_counter() - started


async def measure_builds(scratch: Path, rounds: int) -> dict[str, list[BuildTimes]]:
    """Rounds of four cold environment builds of BUILD_SET, in a rotating order: the service's
    build with the download cache it keeps across builds ("cache", warmed once before), the same
    with an empty cache ("empty"), pip install --target with its own cache kept ("pip-cache",
    warmed once before) and with its cache off ("pip")."""
    cache, pip_cache = scratch / "service-cache", scratch / "pip-cache"
    await service_build(scratch / "warm-up", BUILD_SET, cache)  # an earlier build filled the cache
    await asyncio.to_thread(pip_install_seconds, scratch / "pip-warm-up", BUILD_SET, pip_cache)
    times: dict[str, list[BuildTimes]] = {"cache": [], "empty": [], "pip-cache": [], "pip": []}
    kinds = list(times)
    for number in range(rounds):
        # Rotating which goes first, so that none always meets a cold network path.
        first = number % len(kinds)
        for which in kinds[first:] + kinds[:first]:
            work = Path(tempfile.mkdtemp(dir=scratch))
            try:
                if which.startswith("pip"):
                    kept = pip_cache if which == "pip-cache" else None
                    seconds = await asyncio.to_thread(pip_install_seconds, work / "site", BUILD_SET, kept)
                    times[which].append(BuildTimes(0.0, seconds))
                else:
                    built, _path = await service_build(
                        work / "store", BUILD_SET, cache if which == "cache" else None
                    )
                    times[which].append(built)
            finally:
                _remove(work)
    return times


async def measure_runs(
    environment: Path, package: str, backend_name: str, runs: int, pause: float
) -> dict[str, list[float]]:
    """Samples (ms) of a hello-world ("plain"), of one with `environment` mounted ("mounted") and of
    a run importing `package` from it ("import"), interleaved, each from its warm pool (refilled as
    the executor does once an answer is sent)."""
    backend = create_backend(backend_name)
    await backend.start()
    packages = RunPackages(
        readonly_paths=((str(environment), SANDBOX_MOUNT),), env={"PYTHONPATH": SANDBOX_MOUNT}
    )
    plain = RunSpec("python", LANGUAGES["python"].hello)
    mounted = RunSpec(
        "python", LANGUAGES["python"].hello, env=packages.env, readonly_paths=packages.readonly_paths
    )
    importing = replace(mounted, code=f"import {package}\nprint('hello')")
    specs = {"plain": plain, "mounted": mounted, "import": importing}

    async def one(spec: RunSpec) -> float:
        started = time.perf_counter()
        result = await backend.run(spec)
        elapsed = (time.perf_counter() - started) * 1000
        backend.replenish()
        if (result.stdout, result.exit_code) != ("hello\n", 0):
            raise SystemExit(f"a benchmark run failed: {result.exit_code} {result.stderr[-500:]}")
        return elapsed

    samples: dict[str, list[float]] = {name: [] for name in specs}
    try:
        for number in range(runs + 5):
            for name, spec in specs.items():
                await asyncio.sleep(pause)
                elapsed = await one(spec)
                if number >= 5:  # the first run with the environment starts its warm pool
                    samples[name].append(elapsed)
    finally:
        await backend.close()
    return samples


def measure_mesh(package: str, runs: int, pause: float) -> dict[str, list[float]]:
    """Samples (ms) of a hello-world of a user without packages ("plain") and of `import package`
    by a user whose list holds it ("import"), through the whole mesh, interleaved."""
    # The runner passes this machine's trust store and proxy on to the packages service itself.
    service_env = {
        "auth": {"PYTHONON_AUTH_USER_RATE_BURST": "100000", "PYTHONON_AUTH_USER_RATE_PER_MINUTE": "1000000"},
    }
    with tempfile.TemporaryDirectory() as data_dir:
        config = MeshConfig(port=0, data_dir=Path(data_dir), service_env=service_env, log_level="WARNING")
        with Mesh(config) as mesh, httpx.Client(base_url=mesh.url, timeout=120) as client:
            keys = {}
            for name in ("plain", "import"):
                registered = client.post(
                    "/api/register",
                    json={"email": f"{name}@example.com", "password": "correct horse battery"},
                )
                keys[name] = {"x-api-key": registered.json()["apiKey"]}
            listed = client.put("/api/v1/packages", json={"packages": [package]}, headers=keys["import"])
            if listed.status_code != 200:
                raise SystemExit(f"the package list was refused: {listed.status_code} {listed.text[:200]}")
            deadline = time.monotonic() + 300
            while (state := client.get("/api/v1/packages", headers=keys["import"]).json()["packages"][0])[
                "status"
            ] not in ("ready", "failed"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the environment of {package} was not built in 300 s")
                time.sleep(0.2)
            if state["status"] == "failed":
                raise IndexUnreachable(state["reason"])
            codes = {"plain": "print('hello')", "import": f"import {package}\nprint('hello')"}

            def one(name: str) -> float:
                started = time.perf_counter()
                response = client.post("/api/v1/execute", json={"code": codes[name]}, headers=keys[name])
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200 or response.json()["output"] != "hello\n":
                    raise SystemExit(f"a benchmark run failed: {response.status_code} {response.text[:300]}")
                return elapsed

            samples: dict[str, list[float]] = {name: [] for name in codes}
            for number in range(runs + 10):
                for name in codes:
                    time.sleep(pause)
                    elapsed = one(name)
                    if number >= 10:  # the environment's warm pool starts with its first run
                        samples[name].append(elapsed)
            return samples


def _remove(root: Path) -> None:
    """Remove a tree, the read-only environments included (the store makes them r-x)."""
    for directory, _dirs, _files in os.walk(root):
        os.chmod(directory, 0o700)
    shutil.rmtree(root, ignore_errors=True)


async def measure(arguments: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="bench-packages-"))
    try:
        try:
            builds = await measure_builds(scratch, arguments.rounds)
            _times, environment = await service_build(scratch / "runs", [arguments.package])
        except IndexUnreachable as failure:
            print(f"skipped: the package index cannot be reached from here ({failure})")
            return 0
        samples = await measure_runs(
            environment, arguments.package, arguments.backend, arguments.runs, arguments.pause
        )
        mesh: dict[str, list[float]] = {}
        if not arguments.skip_mesh:
            try:
                mesh = await asyncio.to_thread(
                    measure_mesh, arguments.package, arguments.runs, arguments.pause
                )
            except IndexUnreachable as failure:
                print(f"mesh part skipped: the environment could not be built ({failure})")
    finally:
        _remove(scratch)

    p50 = {name: percentile(values, 0.5) for name, values in samples.items()}
    p95 = {name: percentile(values, 0.95) for name, values in samples.items()}
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"load average at the end: {' '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(f"a new environment of {' '.join(BUILD_SET)} (n={len(builds['pip'])} each, rotating order):")
    labels = {
        "cache": "packages service, its download cache kept across builds",
        "empty": "packages service, an empty download cache",
        "pip-cache": "pip install --target, its cache kept across installs",
        "pip": "pip install --target, --no-cache-dir",
    }
    for which, label in labels.items():
        values = builds[which]
        each = " ".join(f"{value.total:.2f}" for value in values)
        split = ""
        if not which.startswith("pip"):
            split = (
                f"; resolve median {statistics.median(v.resolve for v in values):.2f} s, "
                f"install {statistics.median(v.install for v in values):.2f} s"
            )
        print(
            f"  {label + ':':<58} median {statistics.median(v.total for v in values):.2f} s  ({each}){split}"
        )
    print(
        f"{arguments.backend} sandbox, warm pools, interleaved "
        f"(n={len(samples['plain'])} each, {arguments.pause:g} s apart):"
    )
    lines = {
        "plain": "hello-world",
        "mounted": "hello-world, environment mounted",
        "import": f"`import {arguments.package}` from the environment",
    }
    for name, label in lines.items():
        print(f"  {label + ':':<45} p50 {p50[name]:6.1f} ms  p95 {p95[name]:6.1f} ms")
    print("ratios")
    median = {which: statistics.median(t.total for t in values) for which, values in builds.items()}
    # Like for like: each tool with the cache it keeps, then each with none.
    for ours, theirs, caches in (("cache", "pip-cache", "caches kept"), ("empty", "pip", "empty caches")):
        print(
            f"  new environment, {caches}: packages service / pip install --target = "
            f"{median[ours] / median[theirs]:.2f}   (target <= 0.3)"
        )
    print(
        "  new environment, the service's cache kept / pip install --target --no-cache-dir = "
        f"{median['cache'] / median['pip']:.2f}"
    )
    print(
        f"  import {arguments.package} p50 / hello-world p50 at the sandbox layer = "
        f"{p50['import'] / p50['plain']:.2f}   (the import's own CPU; the target is through the mesh)"
    )
    print(
        f"  hello-world mounted p50 / hello-world p50 = {p50['mounted'] / p50['plain']:.2f}   (the mount's cost)"
    )
    if mesh:
        plain_p50, import_p50 = percentile(mesh["plain"], 0.5), percentile(mesh["import"], 0.5)
        print(
            f"whole mesh through Envoy (the executor's default sandbox), interleaved (n={len(mesh['plain'])} each):"
        )
        print(f"  {'hello-world, a user without packages:':<45} p50 {plain_p50:6.1f} ms")
        print(f"  {'`import ' + arguments.package + '`, a user with it:':<45} p50 {import_p50:6.1f} ms")
        print(
            f"  import {arguments.package} p50 / hello-world p50 through the mesh = "
            f"{import_p50 / plain_p50:.2f}   (target <= 2.0)"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="cold builds of each kind (default 3)")
    parser.add_argument(
        "--package", default="humanize", help="the package the runs import (default humanize)"
    )
    parser.add_argument("--backend", default="bwrap", choices=BACKENDS)
    parser.add_argument("--runs", type=int, default=100, help="runs of each kind (default 100)")
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between runs (gvisor: ~0.5, a container's start)"
    )
    parser.add_argument("--skip-mesh", action="store_true", help="leave out the whole-mesh part")
    return asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
