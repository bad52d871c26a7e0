"""Choosing a backend and its options: an unknown backend or option, or a bad value, is a clear
error (and the executor refuses to start, exit 2, naming it); the clear refusal when the host cannot
run a backend; payloads in a format that does not depend on the executor's Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.executor.sandbox import (
    BackendOptionError,
    Limits,
    RunSpec,
    SandboxUnavailable,
    backend_options,
    create_backend,
    gvisor,
)
from services.executor.sandbox.languages import LANGUAGES, discover
from services.executor.sandbox.runtimes import frame
from services.platform.identity import generate_private_key_pem, public_key_pem
from tests.mesh_identity import mesh_identity_files


def test_an_unknown_backend_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="bwrap, gvisor"):
        create_backend("docker")


@pytest.mark.parametrize("backend", ["bwrap", "gvisor"])
def test_an_unknown_option_is_refused_by_name(backend: str) -> None:
    with pytest.raises(
        BackendOptionError, match=f"unknown option 'pool_sise' for the {backend} sandbox backend"
    ):
        create_backend(backend, pool_sise=2)


def test_an_option_of_the_other_backend_is_refused() -> None:
    with pytest.raises(BackendOptionError, match="unknown option 'runsc_path' for the bwrap"):
        backend_options("bwrap", {"runsc_path": "/usr/bin/runsc"})
    with pytest.raises(BackendOptionError, match="unknown option 'seccomp_filter' for the gvisor"):
        backend_options("gvisor", {"seccomp_filter": False})


@pytest.mark.parametrize(
    ("backend", "options", "message"),
    [
        ("bwrap", {"pool_size": -1}, "option pool_size: expected an integer of at least 0, got -1"),
        ("bwrap", {"pool_size": "2"}, "option pool_size: expected an integer of at least 0, got '2'"),
        ("bwrap", {"max_concurrent": 0}, "option max_concurrent: expected an integer of at least 1, got 0"),
        ("bwrap", {"spawn_timeout": float("nan")}, "option spawn_timeout: expected a positive number"),
        ("bwrap", {"languages": ["python", "cobol"]}, "option languages: unknown language 'cobol'"),
        ("bwrap", {"languages": "python"}, "option languages: a list of languages"),
        ("bwrap", {"executables": {"python": "python3"}}, "option executables: python needs an absolute path"),
        ("bwrap", {"uid_base": 0}, "option uid_base: expected an integer of at least 1000"),
        ("bwrap", {"seccomp_filter": "no"}, "option seccomp_filter: expected true or false"),
        ("bwrap", {"default_limits": {"timeout_seconds": 1}}, "option default_limits: a Limits"),
        ("gvisor", {"platform": "hyperv"}, "option platform: expected one of ptrace, kvm, systrap, got 'hyperv'"),
        ("gvisor", {"runsc_path": "runsc"}, "option runsc_path: expected an absolute path"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_by_name(backend: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendOptionError) as refused:
        backend_options(backend, options)
    assert message in str(refused.value)


def test_good_options_are_kept() -> None:
    options = backend_options("gvisor", {"pool_size": 0, "languages": ["python"], "platform": "ptrace"})
    assert (options.pool_size, options.languages) == (0, ("python",))
    assert options.default_limits == Limits()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"PYTHONON_EXECUTOR_BACKEND_OPTIONS": '{"pool_sise": 2}'}, "unknown option 'pool_sise' for the bwrap sandbox backend"),
        ({"PYTHONON_EXECUTOR_BACKEND": "gvisor", "PYTHONON_EXECUTOR_BACKEND_OPTIONS": '{"platform": "hyperv"}'}, "option platform: expected one of ptrace, kvm, systrap"),
        ({"PYTHONON_EXECUTOR_BACKEND_OPTIONS": "[1]"}, "PYTHONON_EXECUTOR_BACKEND_OPTIONS must be a JSON object"),
        ({"PYTHONON_EXECUTOR_BACKEND_OPTIONS": '{"languages": ["cobol"]}'}, "option languages: unknown language 'cobol'"),
    ],
)  # fmt: skip
def test_the_executor_refuses_to_start_with_a_bad_backend_option(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    key = tmp_path / "identity.pub"
    key.write_bytes(public_key_pem(generate_private_key_pem()))
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONON_PORT": "0",
        "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(key),
        "PYTHONON_SECRETS_ADDRESS": "127.0.0.1:1",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:1",
        **mesh_identity_files(tmp_path, "executor"),
        **settings,
    }
    ended = subprocess.run(
        [sys.executable, "-m", "services.executor"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ended.returncode == 2, ended.stderr
    assert message in ended.stderr
    assert "Traceback" not in ended.stderr


def test_gvisor_without_runsc_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gvisor.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install runsc"):
        create_backend("gvisor")


def test_payloads_are_plain_framed_data_never_a_python_serialisation(tmp_path: Path) -> None:
    runtimes, _ = discover(tmp_path, {})
    spec = RunSpec("python", "print(1)", env={"A": "b"}, files={"d/f.bin": b"\x00\xff"}, private_input=b"pw")
    records = runtimes["python"].payload(spec, cpu_seconds=3, inline_private=True, end_token="ab")
    assert records == (
        b"workdir 10\n/workspace" + b"main 7\nmain.py" + b"code 8\nprint(1)" + b"cpu 1\n3"
        + b"env 4 %d\nPATH%s" % (len(runtimes["python"].path), runtimes["python"].path.encode())
        + b"env 4 10\nHOME/workspace" + b"env 4 7\nLANGC.UTF-8" + b"env 23 1\nPYTHONDONTWRITEBYTECODE1"
        + b"env 16 1\nPYTHONUNBUFFERED1" + b"env 1 1\nAb" + b"file 7 2\nd/f.bin\x00\xff"
        + b"private 2\npw" + b"end 2\nab"
    )  # fmt: skip
    if "javascript" in runtimes:
        js = RunSpec("javascript", "1", files=spec.files)
        message = json.loads(runtimes["javascript"].payload(js, cpu_seconds=3, end_token="ab"))
        assert message["main"] == LANGUAGES["javascript"].main_file and message["code"] == "1"
        assert message["files"] == {"d/f.bin": "AP8="} and message["end_token"] == "ab"
    if "bash" in runtimes:
        script = runtimes["bash"].payload(RunSpec("bash", "echo hi"), cpu_seconds=3).decode("ascii")
        assert script.startswith("exec 4<&-\n") and "exec /usr/bin/env -i" in script
    assert frame(b"{}") == b"2\n{}"


def test_common_aliases_name_their_language() -> None:
    from services.executor.sandbox.languages import canonical_name

    assert {alias: canonical_name(alias) for alias in ("py", "python3", "js", "node", "sh", "bash")} == {
        "py": "python",
        "python3": "python",
        "js": "javascript",
        "node": "javascript",
        "sh": "bash",
        "bash": "bash",
    }
    assert canonical_name("ruby") is None and canonical_name("Python") is None
