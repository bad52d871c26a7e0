"""The gVisor backend, where runsc is installed (skipped with the reason otherwise): the same
contract and the same attacks as the bwrap backend, one container per run."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from services.executor.sandbox import Limits, RunSpec
from tests.sandbox.conftest import CANARY_NAME, CANARY_VALUE, Sandbox, started_backend


@pytest.fixture(scope="module")
def gvisor() -> Iterator[Sandbox]:
    with started_backend("gvisor", max_concurrent=4, max_waiting=8) as backend:
        yield backend


def test_hello_world_with_stdin_env_and_private_input(gvisor: Sandbox) -> None:
    code = "import os, sys\nprint(sys.stdin.read(), os.environ['WHO'], os.read(3, 100).decode(), os.getuid())"
    result = gvisor.python(code, stdin="in", env={"WHO": "me"}, private_input=b"secret")
    assert (result.stdout, result.exit_code) == ("in me secret 65534\n", 0), result.stderr


def test_an_exception_prints_a_normal_traceback(gvisor: Sandbox) -> None:
    result = gvisor.python("1 / 0")
    assert result.exit_code == 1
    assert result.stderr.startswith('Traceback (most recent call last):\n  File "/workspace/main.py", line 1')


def test_other_languages(gvisor: Sandbox) -> None:
    languages = gvisor.backend.languages()
    if "javascript" in languages:
        result = gvisor.run(RunSpec("javascript", "console.log('js', process.env.WHO)", env={"WHO": "me"}))
        assert result.stdout == "js me\n", result.stderr
    if "bash" in languages:
        code = "read -r x; echo sh $x $WHO; cat <&3"
        result = gvisor.run(RunSpec("bash", code, stdin="in\n", env={"WHO": "me"}, private_input=b"secret"))
        assert result.stdout == "sh in me\nsecret", result.stderr


def test_cpu_spin_times_out(gvisor: Sandbox) -> None:
    started = time.monotonic()
    result = gvisor.python("while True:\n    pass", limits=Limits(timeout_seconds=1))
    assert result.timed_out and result.exit_code == 137
    assert "execution timed out after 1 s" in result.stderr
    assert time.monotonic() - started < 2.5
    gvisor.assert_healthy()


def test_memory_bomb_is_killed(gvisor: Sandbox) -> None:
    result = gvisor.python("data = b'x' * (1 << 30)\nprint('allocated')")
    assert result.exit_code == 137 and "allocated" not in result.stdout
    assert "memory limit of 256 MiB" in result.stderr
    gvisor.assert_healthy()


def test_fork_bomb_is_contained(gvisor: Sandbox) -> None:
    code = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)"
    started = time.monotonic()
    result = gvisor.python(code, limits=Limits(timeout_seconds=5))
    assert time.monotonic() - started < 8
    # Under the ptrace platform the sandbox itself dies when its pids cgroup is full.
    assert result.exit_code != 0
    gvisor.assert_healthy()


def test_disk_fill_and_runaway_output(gvisor: Sandbox) -> None:
    code = """
import errno
def fill(path, megabytes):
    try:
        with open(path, "wb") as handle:
            for _ in range(megabytes):
                handle.write(b"x" * (1 << 20))
    except OSError as error:
        return errno.errorcode[error.errno]
    return "no error"
print(fill("/tmp/big", 100), [fill(f"/workspace/part{i}", 15) for i in range(6)][-1])
"""
    assert gvisor.python(code).stdout == "EFBIG ENOSPC\n"
    started = time.monotonic()
    flood = gvisor.python("while True:\n    print('x' * 999)")
    assert flood.truncated and len(flood.stdout) <= 1 << 20 and time.monotonic() - started < 5
    gvisor.assert_healthy()


def test_no_network_and_no_host_environment(gvisor: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = f"""
import json, os, socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    reached = True
except OSError:
    reached = False
print(json.dumps({{"interfaces": [n for _, n in socket.if_nameindex()], "reached": reached,
                  "environ": dict(os.environ)}}))
"""
    try:
        result = gvisor.python(code)
    finally:
        listener.close()
    seen = json.loads(result.stdout)
    assert seen["interfaces"] == ["lo"] and not seen["reached"]
    assert CANARY_NAME not in result.stdout and CANARY_VALUE not in result.stdout


def test_writes_outside_stay_out_and_nothing_persists(gvisor: Sandbox) -> None:
    code = """
outcome = []
for path in ("/etc/evil", "/usr/lib/evil", "/evil", "/tmp/kept"):
    try:
        open(path, "w").write("x")
        outcome.append("written")
    except OSError as error:
        outcome.append(type(error).__name__)
print(outcome)
"""
    assert gvisor.python(code).stdout.count("written") == 1  # /tmp only
    assert gvisor.python("import os\nprint(os.path.exists('/tmp/kept'))").stdout == "False\n"
