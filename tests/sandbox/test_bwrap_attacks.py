"""Hostile programs against the bwrap backend: each attack must fail (or be contained), and the
very next run on the same backend must answer normally."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from services.executor.sandbox import Limits, RunSpec
from services.executor.sandbox.bwrap import DEFAULT_UID_BASE
from tests.host_processes import no_process_left
from tests.sandbox.conftest import CANARY_NAME, CANARY_VALUE, Sandbox


def test_fork_bomb_is_held_to_the_process_limit(sandbox: Sandbox) -> None:
    code = """
import os, time
print(os.getuid())
children = 0
try:
    for _ in range(10_000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as error:
    print("refused after", children, error.errno)
"""
    result = sandbox.python(code, limits=Limits(timeout_seconds=10, processes=32))
    assert result.exit_code == 0, result.stderr
    uid, *words = result.stdout.split()
    assert words[:2] == ["refused", "after"] and int(words[2]) < 32 and words[3] == "11"  # EAGAIN
    assert no_process_left(int(uid))  # the sleeping children died with the sandbox
    sandbox.assert_healthy()


def test_shell_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    if "bash" not in sandbox.backend.languages():
        pytest.skip("bash is not available on this host")
    started = time.monotonic()
    result = sandbox.run(RunSpec("bash", "id -u\n:(){ :|:& };:; wait", limits=Limits(timeout_seconds=2)))
    assert time.monotonic() - started < 4
    assert "fork: retry: Resource temporarily unavailable" in result.stderr or result.timed_out
    assert no_process_left(int(result.stdout.split()[0]))
    sandbox.assert_healthy()


def test_memory_bomb_is_killed_with_a_clear_message(sandbox: Sandbox) -> None:
    result = sandbox.python("data = b'x' * (1 << 30)\nprint('allocated', len(data))")
    assert "allocated" not in result.stdout
    if sandbox.backend.enforced_limits()["memory"]:
        assert result.exit_code == 137
        assert "memory limit of 256 MiB exceeded" in result.stderr
    else:
        assert result.exit_code == 1 and "MemoryError" in result.stderr
    sandbox.assert_healthy()


def test_cpu_spin_times_out_within_a_second_of_the_limit(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = sandbox.python(
        "print('spinning', flush=True)\nwhile True:\n    pass", limits=Limits(timeout_seconds=1)
    )
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == 137
    assert result.stdout == "spinning\n"  # what it printed before is kept
    assert "execution timed out after 1 s" in result.stderr
    assert 1000 <= result.duration_ms < 2000
    assert elapsed < 3
    sandbox.assert_healthy()


def test_timeout_kills_every_child_too(sandbox: Sandbox) -> None:
    code = """
import os, time
print(os.getuid(), flush=True)
for _ in range(5):
    if os.fork() == 0:
        while True:
            pass
time.sleep(60)
"""
    result = sandbox.python(code, limits=Limits(timeout_seconds=1))
    assert result.timed_out
    assert no_process_left(int(result.stdout))
    sandbox.assert_healthy()


@pytest.mark.parametrize("directory", ["/tmp", "/workspace", "/dev/shm"])
def test_filling_the_disk_fails_and_stays_in_the_sandbox(sandbox: Sandbox, directory: str) -> None:
    code = f"""
import errno
chunk = b"x" * (1 << 20)
def fill(path, megabytes):
    written = 0
    try:
        with open(path, "wb") as handle:
            for _ in range(megabytes):
                handle.write(chunk)
                handle.flush()
                written += 1
    except OSError as error:
        return written, errno.errorcode[error.errno]
    return written, "no error"
print(*fill("{directory}/big", 100))            # one file past the file-size limit
results = [fill(f"{directory}/part{{i}}", 15) for i in range(8)]  # many files past the tmpfs size
print(sum(w for w, _ in results), results[-1][1])
"""
    result = sandbox.python(code)
    assert result.exit_code == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "16 EFBIG"  # RLIMIT_FSIZE: 16 MiB
    written, error = second.split()
    assert error == "ENOSPC" and int(written) < 64
    # The next run gets an empty, full-size directory again.
    again = sandbox.python(
        f"import os\nprint(os.listdir('{directory}'))\nopen('{directory}/x','wb').write(b'y'*(8<<20))"
    )
    expected = ["main.py"] if directory == "/workspace" else []
    assert again.stdout == f"{expected}\n" and again.exit_code == 0, again.stderr
    sandbox.assert_healthy()


def test_fallocate_cannot_fill_the_disk(sandbox: Sandbox) -> None:
    if "bash" not in sandbox.backend.languages():
        pytest.skip("bash is not available on this host")
    result = sandbox.run(RunSpec("bash", "fallocate -l 100M /tmp/big; echo rc=$?; ls -la /tmp"))
    assert "rc=0" not in result.stdout
    sandbox.assert_healthy()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_forever_is_truncated_quickly(sandbox: Sandbox, stream: str) -> None:
    started = time.monotonic()
    result = sandbox.python(f"import sys\nwhile True:\n    print('x' * 999, file=sys.{stream})")
    assert time.monotonic() - started < 5
    assert result.truncated and not result.timed_out
    flood = getattr(result, stream)
    assert len(flood.encode()) >= (1 << 20) - 1000
    assert len(flood.encode()) <= (1 << 20) + 200  # the cap, plus the sandbox's note on stderr
    assert "output limit of 1 MiB per stream exceeded" in result.stderr
    sandbox.assert_healthy()


def test_network_egress_to_the_host_fails_and_only_loopback_exists(sandbox: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = f"""
import socket
print(socket.if_nameindex())
print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]))
for host in ("127.0.0.1", "localhost"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print("connected")
    except OSError as error:
        print(type(error).__name__)
"""
    try:
        result = sandbox.python(code)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    lines = result.stdout.splitlines()
    assert lines[0] == "[(1, 'lo')]" and lines[1] == "['lo']"
    assert "connected" not in result.stdout
    assert lines[2:] == ["ConnectionRefusedError", "ConnectionRefusedError"], result.stderr
    sandbox.assert_healthy()


def test_writing_outside_tmp_and_the_workdir_fails(sandbox: Sandbox, tmp_path: Path) -> None:
    targets = ["/etc/evil", "/usr/evil", "/usr/lib/evil", "/evil", "/proc/sys/kernel/hostname", "/dev/evil",
               f"{os.path.realpath(sys.base_prefix)}/evil", str(tmp_path / "evil"), "/work/evil"]  # fmt: skip
    code = f"""
import json
outcome = {{}}
for path in {targets!r}:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        outcome[path] = "written"
    except OSError as error:
        outcome[path] = type(error).__name__
print(json.dumps(outcome))
"""
    result = sandbox.python(code)
    outcome = json.loads(result.stdout)
    assert "written" not in outcome.values(), outcome
    assert not (tmp_path / "evil").exists()
    assert not Path(sys.base_prefix, "evil").exists()
    sandbox.assert_healthy()


def test_a_file_written_in_one_run_is_gone_in_the_next(sandbox: Sandbox) -> None:
    first = sandbox.python(
        "open('/tmp/left-behind', 'w').write('x')\nopen('left-behind', 'w').write('x')\nprint('ok')"
    )
    assert first.stdout == "ok\n"
    second = sandbox.python(
        "import os\nprint(os.path.exists('/tmp/left-behind'), os.path.exists('left-behind'))"
    )
    assert second.stdout == "False False\n"


def test_no_host_environment_leaks(sandbox: Sandbox) -> None:
    code = """
import os, json
def read(path):
    try:
        return open(path, "rb").read().decode(errors="replace")
    except OSError as error:
        return type(error).__name__
print(json.dumps({"init": read("/proc/1/environ"), "self": read("/proc/self/environ"),
                  "cmdline": read("/proc/self/cmdline"), "environ": dict(os.environ)}))
"""
    result = sandbox.python(code, env={"ONLY_THIS": "given"})
    seen = json.loads(result.stdout)
    assert CANARY_VALUE not in result.stdout and CANARY_NAME not in result.stdout
    assert set(seen["environ"]) == {
        "PATH",
        "HOME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "ONLY_THIS",
    }
    own = " ".join(seen["environ"].values())  # e.g. the runtime's directory in PATH
    for name, value in os.environ.items():  # nothing else of the test process's own environment
        if len(value) > 6 and value not in own:
            assert value not in result.stdout, name
    sandbox.assert_healthy()


def test_a_host_directory_is_not_readable(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    code = f"""
import os
for path in ({str(secret)!r}, {str(tmp_path)!r}, "/root", "/home", "/var"):
    try:
        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as error:
        print(path, type(error).__name__)
"""
    result = sandbox.python(code)
    assert "host secret" not in result.stdout
    assert f"{secret} FileNotFoundError" in result.stdout
    sandbox.assert_healthy()


def test_the_program_is_not_root_and_has_no_capabilities(sandbox: Sandbox) -> None:
    code = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(os.getuid(), os.geteuid(), os.getgid(), status["CapEff"].strip(), status["CapPrm"].strip(),
      status["NoNewPrivs"].strip(), *open("/proc/self/uid_map").read().split())
"""
    result = sandbox.python(code)
    uid, euid, gid, cap_effective, cap_permitted, no_new_privs, *uid_map = result.stdout.split()
    assert int(uid) != 0 and int(euid) != 0 and int(gid) != 0
    assert int(cap_effective, 16) == 0 and int(cap_permitted, 16) == 0 and no_new_privs == "1"
    if os.geteuid() == 0:
        # No user namespace: the uid inside is the uid on the host, so it is not root there either.
        assert uid_map == ["0", "0", "4294967295"] and int(uid) >= DEFAULT_UID_BASE
    sandbox.assert_healthy()


def test_user_namespaces_and_mounts_are_refused(sandbox: Sandbox) -> None:
    if not sandbox.backend.enforced_limits().get("seccomp"):
        pytest.skip("no seccomp filter on this architecture")
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
print(libc.unshare(0x00020000), ctypes.get_errno())  # CLONE_NEWNS
print(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None), ctypes.get_errno())
"""
    result = sandbox.python(code)
    assert result.stdout.split() == ["-1", "1", "-1", "1", "-1", "1"], result.stderr  # EPERM
    sandbox.assert_healthy()


def test_twenty_runs_in_parallel_each_get_their_own_output(sandbox: Sandbox) -> None:
    specs = [
        RunSpec("python", f"import os\nprint({i}, os.environ['N'])", env={"N": str(i)}) for i in range(20)
    ]
    results = sandbox.gather(specs)
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        assert result.stdout == f"{i} {i}\n" and result.exit_code == 0
    sandbox.assert_healthy()
