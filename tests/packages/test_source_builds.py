"""The parts of source builds that need no sandbox: when one is needed, the operator's switch, the
check of what the sandbox answered, and what the host reads of an sdist (nothing is run)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from services.packages import source_builds
from services.packages.settings import PackagesSettings
from services.packages.source_builds import SourceBuildFailed, needs_source_build
from services.platform.settings import Environment, SettingsError


def _settings(tmp_path: Path, **extra: str) -> PackagesSettings:
    environ = {
        **os.environ,
        "PYTHONON_PACKAGES_DIR": str(tmp_path),
        "PYTHONON_DATABASE_URL": "sqlite://",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:1",
        **extra,
    }
    return PackagesSettings.load(Environment(environ))


def test_source_builds_are_off_unless_the_operator_says_true(tmp_path: Path) -> None:
    assert _settings(tmp_path).source_builds is False
    assert _settings(tmp_path, PYTHONON_PACKAGES_SOURCE_BUILDS="true").source_builds is True
    with pytest.raises(SettingsError, match="PYTHONON_PACKAGES_SOURCE_BUILDS must be true or false"):
        _settings(tmp_path, PYTHONON_PACKAGES_SOURCE_BUILDS="yes please")


def test_the_resolvers_no_wheel_message_names_the_package_to_build() -> None:
    message = (
        "error: No solution found when resolving dependencies\n  cause: Because tiny-sdist-only==0.1 "
        "has no usable wheels and only tiny-sdist-only==0.1 is available, we can conclude ..."
    )
    assert needs_source_build(message) == ("tiny-sdist-only", "0.1")
    assert needs_source_build("error: Because tiny-nothing was not found in the package registry") is None


@pytest.mark.parametrize(
    "wheel",
    ["requests-99.0-py3-none-any.whl", "tiny_src-0.3-py3-none-any.whl", "tiny_src-0.2.tar.gz", "../x.whl"],
)
def test_a_wheel_of_another_package_or_version_is_refused(wheel: str) -> None:
    with pytest.raises(SourceBuildFailed):
        source_builds._check_wheel(wheel, "tiny-src", "0.2")
    source_builds._check_wheel("tiny_src-0.2-py3-none-any.whl", "tiny-src", "0.2")


def _sdist(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, text in files.items():
            entry = tarfile.TarInfo(f"tiny_src-0.2/{path}")
            entry.size = len(text.encode())
            archive.addfile(entry, io.BytesIO(text.encode()))
    return buffer.getvalue()


def test_the_host_reads_only_the_build_system_of_an_sdist() -> None:
    declared = _sdist(
        {
            "pyproject.toml": '[build-system]\nrequires = ["flit_core>=3"]\nbuild-backend = "flit_core.buildapi"\n',
            "setup.py": "raise SystemExit('never run')\n",
        }
    )
    assert source_builds._build_system(declared, "tiny-src") == (["flit_core>=3"], "flit_core.buildapi", [])
    legacy = _sdist({"setup.py": "raise SystemExit('never run')\n"})
    assert source_builds._build_system(legacy, "tiny-src") == (
        ["setuptools>=40.8.0"],
        "setuptools.build_meta:__legacy__",
        [],
    )
    escaping = _sdist(
        {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "b"\nbackend-path = ["/etc"]\n'}
    )
    with pytest.raises(SourceBuildFailed, match="not valid"):
        source_builds._build_system(escaping, "tiny-src")
    with pytest.raises(SourceBuildFailed, match="not a readable"):
        source_builds._build_system(b"not a tarball", "tiny-src")


def test_prune_keeps_what_a_lock_pins_and_build_environments_used_lately(tmp_path: Path) -> None:
    limits = source_builds.SourceBuildLimits(seconds=10, memory_bytes=1 << 20, disk_bytes=1 << 20)
    builder = source_builds.SourceBuilder(None, tmp_path, "http://127.0.0.1:1/simple", limits)  # type: ignore[arg-type]  # prune starts no sandbox
    built, environments = tmp_path / "built", tmp_path / "build-environments"
    for directory, wheel in (
        ("a", "tiny_a-1.0-py3-none-any.whl"),
        ("b", "tiny_b-2.0.0-py3-none-any.whl"),
        ("c", "tiny_c-0.1-py3-none-any.whl"),  # pinned by no lock
        ("unfinished-x", "tiny_d-1.0-py3-none-any.whl"),  # a build's, not yet in place
    ):
        (built / directory).mkdir()
        (built / directory / wheel).write_bytes(b"wheel")
    now = 1_800_000_000.0
    for directory, age_days in (("used-lately", 6), ("stale", 8), ("unfinished-y", 30)):
        (environments / directory).mkdir()
        when = now - age_days * 24 * 3600
        os.utime(environments / directory, (when, when))

    # Names and versions as a lock writes them: compared canonically (Tiny_B 2 is tiny-b 2.0.0).
    assert builder.prune({("tiny-a", "1.0"), ("Tiny_B", "2")}, now=now) == 2
    assert sorted(path.name for path in built.iterdir()) == ["a", "b", "unfinished-x"]
    assert sorted(path.name for path in environments.iterdir()) == ["unfinished-y", "used-lately"]
