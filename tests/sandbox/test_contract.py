"""The sandbox contract, run against every backend: what an ordinary program gets (output, input,
environment, files, private input, exit status, tracebacks, as a plain interpreter would give
them), the limits, and every attack — each must fail or be contained, and the very next run on the
same backend must answer normally.

A backend added later gets the whole suite by adding its factory to BACKENDS. A backend that cannot
run on this host (gvisor without runsc, or where runsc cannot start a sandbox) is skipped with the
reason. Backend-specific tests live in their own files (test_bwrap.py, test_backends.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.executor import encrypted_runs
from services.executor.packages_client import RunPackages
from services.executor.sandbox import Limits, RunResult, RunSpec, SandboxBusy, SandboxError, zk_decryptor
from services.platform.package_store import SANDBOX_MOUNT
from services.zk import recipe
from tests.host_processes import no_process_left
from tests.sandbox.conftest import (
    CANARY_NAME,
    CANARY_VALUE,
    BackendFactory,
    Sandbox,
    bwrap_factory,
    bwrap_staged_factory,
    gvisor_factory,
)
from tests.sandbox.local_cluster import kubernetes_factory

BACKENDS = [bwrap_factory, bwrap_staged_factory, gvisor_factory, kubernetes_factory]

NOBODY = 65534


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda factory: factory.id)
def factory(request: pytest.FixtureRequest) -> BackendFactory:
    return request.param  # type: ignore[no-any-return]  # pytest's param is untyped


@pytest.fixture(autouse=True)
def only_what_this_host_can_show(request: pytest.FixtureRequest, factory: BackendFactory) -> None:
    """A backend whose limits are a cluster's (kubernetes) names the cases a local stand-in cannot show."""
    reason = getattr(factory, "needs_a_cluster", {}).get(request.node.originalname)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def sandbox(factory: BackendFactory) -> Iterator[Sandbox]:
    with factory() as started:
        yield started


def nothing_left(uid: int) -> bool:
    """No host process of the sandbox's uid remains. A sandbox running as nobody (gVisor: its
    processes live inside its own kernel, not on the host) shares that uid with the host's other
    nobody processes, so nothing can be concluded from it."""
    return uid == NOBODY or no_process_left(uid)


def needs(sandbox: Sandbox, language: str) -> None:
    if language not in sandbox.backend.languages():
        pytest.skip(f"{language} is not available on this host")


# -- results ----------------------------------------------------------------------------------------


def test_hello_world(sandbox: Sandbox) -> None:
    result = sandbox.python("print('hello, world')")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello, world\n", "", 0)
    assert not result.timed_out and not result.truncated and result.duration_ms >= 0


def test_stdin_is_delivered(sandbox: Sandbox) -> None:
    text = "first line\nsecond line\n" + "x" * 200_000  # more than a pipe holds at once
    result = sandbox.python(
        "import sys\ndata = sys.stdin.read()\nprint(len(data), data.splitlines()[1])", stdin=text
    )
    assert result.stdout == f"{len(text)} second line\n", result.stderr
    assert sandbox.python("import sys\nprint(repr(sys.stdin.read()))").stdout == "''\n"


def test_env_is_delivered_and_inherited_by_child_processes(sandbox: Sandbox) -> None:
    code = """
import os, subprocess, sys
print(os.environ["GREETING"])
show = "import os; print(os.environ['GREETING'])"
child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
print(child.stdout.strip(), child.returncode)
"""
    result = sandbox.python(code, env={"GREETING": "héllo wörld $HOME 'quoted'"})
    assert result.stdout == "héllo wörld $HOME 'quoted'\nhéllo wörld $HOME 'quoted' 0\n", result.stderr


def test_private_input_is_on_fd_3_and_nowhere_else(sandbox: Sandbox) -> None:
    secret = b"correct horse battery staple"
    code = """
import os
data = b""
while chunk := os.read(3, 4096):
    data += chunk
print(data.decode())
everywhere = open("/proc/self/environ", "rb").read() + open("/proc/self/cmdline", "rb").read()
print(b"horse" in everywhere, any("horse" in v for v in os.environ.values()))
"""
    result = sandbox.python(code, private_input=secret)
    assert result.stdout == "correct horse battery staple\nFalse False\n", result.stderr
    # Without private input, fd 3 is simply at its end.
    assert sandbox.python("import os\nprint(os.read(3, 10))").stdout == "b''\n"


def test_only_the_standard_descriptors_and_fd_3_are_open(sandbox: Sandbox) -> None:
    result = sandbox.python(
        "import os\nfds = os.listdir('/proc/self/fd')\nprint(sorted(int(f) for f in fds)[:-1])"
    )
    assert result.stdout == "[0, 1, 2, 3]\n", result.stderr  # the payload pipe is closed


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [
        ("import sys\nsys.exit(3)", 3, ""),
        ("import os\nos._exit(7)", 7, ""),
        ("raise SystemExit('bye')", 1, "bye\n"),
        ("import sys\nprint('partial')\nsys.exit(0)", 0, ""),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 137, ""),
    ],
)
def test_exit_status_propagates(sandbox: Sandbox, code: str, status: int, stderr: str) -> None:
    result = sandbox.python(code)
    assert (result.exit_code, result.stderr) == (status, stderr)


def test_an_exception_prints_a_normal_traceback(sandbox: Sandbox) -> None:
    result = sandbox.python("def divide(x):\n    return x / 0\n\ndivide(1)\n")
    assert result.exit_code == 1
    assert result.stderr == (
        "Traceback (most recent call last):\n"
        '  File "/workspace/main.py", line 4, in <module>\n'
        "    divide(1)\n"
        '  File "/workspace/main.py", line 2, in divide\n'
        "    return x / 0\n"
        "           ~~^~~\n"
        "ZeroDivisionError: division by zero\n"
    )


def test_a_syntax_error_is_reported_like_the_interpreter_does(sandbox: Sandbox) -> None:
    result = sandbox.python("print('a'\n")
    assert result.exit_code == 1
    assert result.stderr.startswith('  File "/workspace/main.py", line 1\n')
    assert result.stderr.rstrip().endswith("SyntaxError: '(' was never closed")


def test_the_program_runs_as_main_with_clean_globals(sandbox: Sandbox) -> None:
    code = "import sys\nprint(__name__, __file__, sys.argv, sorted(k for k in globals() if k[0] != '_'))"
    result = sandbox.python(code)
    assert result.stdout == "__main__ /workspace/main.py ['/workspace/main.py'] ['sys']\n", result.stderr


def test_threads_and_atexit_finish_before_the_end(sandbox: Sandbox) -> None:
    code = """
import atexit, threading, time
atexit.register(lambda: print("atexit ran"))
def late():
    time.sleep(0.2)
    print("thread done")
threading.Thread(target=late).start()
print("main done")
"""
    result = sandbox.python(code)
    assert result.stdout == "main done\nthread done\natexit ran\n", result.stderr


def test_files_are_placed_in_the_working_directory(sandbox: Sandbox) -> None:
    files = {"helper.py": b"VALUE = 42\n", "data/blob.bin": bytes(range(256)) * 10}
    code = (
        "import helper\nblob = open('data/blob.bin', 'rb').read()\nprint(helper.VALUE, len(blob), blob[:3])"
    )
    result = sandbox.python(code, files=files)
    assert result.stdout == "42 2560 b'\\x00\\x01\\x02'\n", result.stderr


def test_readonly_paths_are_mounted_read_only(sandbox: Sandbox, tmp_path: Path) -> None:
    package = tmp_path / "site" / "greeting"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WORD = 'from the package'\n")
    for directory in (tmp_path, tmp_path / "site", package):
        directory.chmod(0o755)
    (package / "__init__.py").chmod(0o644)
    code = """
import greeting
print(greeting.WORD)
try:
    open("/opt/env/greeting/new.py", "w")
except OSError as error:
    print(type(error).__name__)
"""
    result = sandbox.python(
        code, env={"PYTHONPATH": "/opt/env"}, readonly_paths=[(str(tmp_path / "site"), "/opt/env")]
    )
    assert result.stdout.startswith("from the package\n") and result.stdout.endswith("Error\n"), result.stderr
    assert not (package / "new.py").exists()


# -- a user's package environment (issue 11): the shape the executor gives a run ------------------------


def package_environment(root: Path, module: str, word: str) -> Path:
    """A tiny environment laid out as the packages service builds one (a package and its dist-info in
    an instance directory), world-writable: only the read-only mount can keep a run from writing."""
    site = root / module / "i-0"
    package = site / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"WORD = {word!r}\n")
    metadata = site / f"{module}-1.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    for directory in (root, root / module):
        directory.chmod(0o755)
    for directory, _dirs, files in os.walk(site):
        os.chmod(directory, 0o777)  # noqa: S103 - on purpose: the mount, not the mode, must refuse
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666)  # noqa: S103 - as above
    return site


def with_environment(site: Path) -> dict[str, Any]:
    """The RunSpec fields the executor sets for a user with a ready environment (packages_client)."""
    mounted = RunPackages(readonly_paths=((str(site), SANDBOX_MOUNT),), env={"PYTHONPATH": SANDBOX_MOUNT})
    return {"readonly_paths": mounted.readonly_paths, "env": mounted.env}


def tree_of(root: Path) -> list[tuple[str, int, int]]:
    """Every entry under `root` with its size and modification time (what a write would change)."""
    return sorted(
        (str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
    )


def test_a_package_environment_is_importable_from_the_run(sandbox: Sandbox, tmp_path: Path) -> None:
    site = package_environment(tmp_path, "greeting", "from the environment")
    code = """
import importlib.metadata, subprocess, sys
import greeting
print(greeting.WORD, greeting.__file__, importlib.metadata.version("greeting"))
child = subprocess.run([sys.executable, "-c", "import greeting; print(greeting.WORD)"], capture_output=True, text=True)
print(child.stdout.strip(), child.returncode)
"""
    result = sandbox.python(code, **with_environment(site))
    assert result.stdout == (
        f"from the environment {SANDBOX_MOUNT}/greeting/__init__.py 1.0\nfrom the environment 0\n"
    ), result.stderr
    assert result.stderr == ""


def test_a_bash_run_finds_the_environment_through_python3(sandbox: Sandbox, tmp_path: Path) -> None:
    needs(sandbox, "bash")
    site = package_environment(tmp_path, "greeting", "bash sees it")
    code = "python3 -c 'import greeting; print(greeting.WORD)'"
    result = sandbox.run(RunSpec("bash", code, **with_environment(site)))
    assert (result.stdout, result.stderr, result.exit_code) == ("bash sees it\n", "", 0)


def test_a_run_cannot_write_into_its_package_environment(sandbox: Sandbox, tmp_path: Path) -> None:
    site = package_environment(tmp_path, "greeting", "unchanged")
    before = tree_of(site)
    code = f"""
import errno, os
root = "{SANDBOX_MOUNT}"
attempts = {{
    "create": lambda: open(root + "/greeting/evil.py", "w"),
    "overwrite": lambda: open(root + "/greeting/__init__.py", "w"),
    "append": lambda: open(root + "/greeting/__init__.py", "a"),
    "mkdir": lambda: os.mkdir(root + "/greeting/__pycache__"),
    "unlink": lambda: os.unlink(root + "/greeting/__init__.py"),
    "rename": lambda: os.rename(root + "/greeting", root + "/moved"),
    "chmod": lambda: os.chmod(root + "/greeting/__init__.py", 0o777),
    "utime": lambda: os.utime(root + "/greeting/__init__.py", (0, 0)),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "succeeded")
    except OSError as error:
        print(name, errno.errorcode[error.errno])
import greeting
print(greeting.WORD)
"""
    result = sandbox.python(code, **with_environment(site))
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        f"{name} EROFS" for name in ("create", "overwrite", "append", "mkdir", "unlink", "rename")
    ], result.stderr
    # Changing a file's metadata needs its owner first: a kernel may refuse that before the mount.
    assert lines[6] in ("chmod EROFS", "chmod EPERM") and lines[7] in ("utime EROFS", "utime EPERM"), lines
    assert lines[8:] == ["unchanged"], result.stderr
    # Nothing changed on the host, not even a __pycache__ from the import.
    assert tree_of(site) == before
    sandbox.assert_healthy()


def test_a_run_sees_only_its_own_package_environment(sandbox: Sandbox, tmp_path: Path) -> None:
    """After a run with user A's environment (which keeps a warm pool for it), a run with user B's
    sees B's and not A's, and a run without an environment sees neither, nor the host's paths."""
    first = package_environment(tmp_path, "first_user_package", "first")
    second = package_environment(tmp_path, "second_user_package", "second")
    probe = f"""
import importlib.util, os
print([name for name in ("first_user_package", "second_user_package") if importlib.util.find_spec(name)])
print(os.path.exists("{SANDBOX_MOUNT}"), os.path.exists("{first}"), os.path.exists("{second}"))
"""
    assert (
        sandbox.python(probe, **with_environment(first)).stdout
        == "['first_user_package']\nTrue False False\n"
    )
    assert (
        sandbox.python(probe, **with_environment(second)).stdout
        == "['second_user_package']\nTrue False False\n"
    )
    # The warm pool kept for an environment never serves a run that did not ask for it.
    for _ in range(2):
        alone = sandbox.python(probe, env={"PYTHONPATH": SANDBOX_MOUNT})
        assert (alone.stdout, alone.stderr) == ("[]\nFalse False False\n", "")
    again = sandbox.python(probe, **with_environment(first))
    assert again.stdout == "['first_user_package']\nTrue False False\n", again.stderr


def test_a_pooled_sandbox_that_waited_longer_than_the_timeout_is_fine(sandbox: Sandbox) -> None:
    sandbox.python("print('take one, so the pool refills')")
    time.sleep(1.5)
    result = sandbox.python("print('ok')", limits=Limits(timeout_seconds=1))
    assert (result.stdout, result.timed_out, result.exit_code) == ("ok\n", False, 0)


def test_limits_other_than_the_defaults_get_a_sandbox_of_their_own(sandbox: Sandbox) -> None:
    code = "import os\nos.write(1, b'x' * 10)\nwith open('/tmp/f', 'wb') as f:\n    f.write(b'y' * 5000)"
    result = sandbox.python(code, limits=Limits(file_bytes=4096, tmp_bytes=1 << 20))
    assert result.stdout == "x" * 10 and "File too large" in result.stderr


def test_javascript_hello_world(sandbox: Sandbox) -> None:
    needs(sandbox, "javascript")
    code = (
        "const fs = require('fs');\n"
        "console.log('hi', process.env.WHO, fs.readFileSync(0, 'utf8').trim(), require.main === module)"
    )
    result = sandbox.run(RunSpec("javascript", code, env={"WHO": "js"}, stdin="in"))
    assert (result.stdout, result.stderr, result.exit_code) == ("hi js in true\n", "", 0)
    failing = sandbox.run(RunSpec("javascript", "process.exitCode = 4; throw new Error('boom')"))
    assert failing.exit_code == 1 and "Error: boom" in failing.stderr and "main.js" in failing.stderr
    assert "pythonon-exit" not in failing.stderr


def test_a_forged_end_marker_is_ordinary_output(sandbox: Sandbox) -> None:
    """The marker that ends a run carries a token of that run: one written by the program without it
    neither ends the run nor loses what follows."""
    code = (
        "import os, time\n"
        "os.write(2, b'\\0pythonon-exit 0000000000000000 0\\n')\n"
        "time.sleep(0.3)\n"
        "print('after')\n"
        "raise SystemExit(4)"
    )
    result = sandbox.run(RunSpec("python", code))
    assert (result.stdout, result.exit_code) == ("after\n", 4)
    assert result.stderr == "\0pythonon-exit 0000000000000000 0\n"


def test_bash_hello_world(sandbox: Sandbox) -> None:
    needs(sandbox, "bash")
    code = "read -r line\necho \"hi $WHO $line $(sh -c 'echo $WHO') $(cat data.txt | wc -c)\"\nexit 5"
    result = sandbox.run(
        RunSpec("bash", code, env={"WHO": "bash user"}, stdin="in\n", files={"data.txt": b"12345"})
    )
    assert (result.stdout, result.stderr, result.exit_code) == ("hi bash user in bash user 5\n", "", 5)
    private = sandbox.run(RunSpec("bash", "cat <&3", private_input=b"secret"))
    assert private.stdout == "secret", private.stderr


def test_invalid_specs_are_refused_before_running(sandbox: Sandbox) -> None:
    for spec in (
        RunSpec("cobol", "DISPLAY 'HI'."),
        RunSpec("python", "print(1)", files={"../escape": b""}),
        RunSpec("python", "print(1)", files={"main.py": b""}),
        RunSpec("python", "print(1)", env={"A=B": "c"}),
    ):
        with pytest.raises(ValueError):
            sandbox.run(spec)


def test_runs_in_parallel_each_get_their_own_output(sandbox: Sandbox) -> None:
    specs = [
        RunSpec("python", f"import os\nprint({i}, os.environ['N'])", env={"N": str(i)}) for i in range(10)
    ]
    results = sandbox.gather(specs)
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        assert result.stdout == f"{i} {i}\n" and result.exit_code == 0
    sandbox.assert_healthy()


# -- limits -----------------------------------------------------------------------------------------


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
    assert nothing_left(int(result.stdout))
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


def test_fork_bomb_is_held_to_the_process_limit(sandbox: Sandbox) -> None:
    code = """
import os, time
print(os.getuid(), flush=True)
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
    started = time.monotonic()
    result = sandbox.python(code, limits=Limits(timeout_seconds=5, processes=32))
    assert time.monotonic() - started < 8
    uid, *words = result.stdout.split()
    if words:  # refused by the process limit (EAGAIN)
        assert words[:2] == ["refused", "after"] and int(words[2]) < 32 and words[3] == "11", result
        assert result.exit_code == 0, result.stderr
    else:  # gVisor's ptrace platform: the sandbox itself dies when its pids cgroup is full
        assert result.exit_code != 0, result
    assert nothing_left(int(uid))  # the sleeping children died with the sandbox
    sandbox.assert_healthy()


def test_shell_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    needs(sandbox, "bash")
    started = time.monotonic()
    result = sandbox.run(RunSpec("bash", "id -u\n:(){ :|:& };:; wait", limits=Limits(timeout_seconds=2)))
    assert time.monotonic() - started < 5
    refused = (
        "fork: retry: Resource temporarily unavailable" in result.stderr
        or result.timed_out
        or result.exit_code != 0
    )
    # Or the script ended first: each `:` backgrounds its pipeline and returns, so the bomb's
    # processes are not the shell's children and `wait` answers 0 at once; the run ends at the
    # bootstrap's end marker and the sandbox, bomb and all, is killed. Either way the bomb ran
    # (the uid was printed first), ended within the time above, and left nothing.
    assert refused or (result.exit_code == 0 and result.stdout.strip().isdigit()), result
    assert nothing_left(int(result.stdout.split()[0]))
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
    needs(sandbox, "bash")
    result = sandbox.run(RunSpec("bash", "fallocate -l 100M /tmp/big; echo rc=$?; ls -la /tmp"))
    assert "rc=0" not in result.stdout
    sandbox.assert_healthy()


def run_listening(sandbox: Sandbox, spec: RunSpec) -> tuple[RunResult, list[tuple[float, str, bytes]], float]:
    """The result, what `on_output` heard (seconds on the loop's clock, stream, bytes), and when the
    run ended on that clock."""
    heard: list[tuple[float, str, bytes]] = []

    async def run() -> tuple[RunResult, float]:
        loop = asyncio.get_running_loop()
        try:
            result = await sandbox.backend.run(
                spec, lambda stream, data: heard.append((loop.time(), stream, data))
            )
        finally:
            sandbox.backend.replenish()
        return result, loop.time()

    result, ended = sandbox.loop.call(run())
    return result, heard, ended


def heard_of(heard: list[tuple[float, str, bytes]], stream: str) -> bytes:
    return b"".join(data for _, name, data in heard if name == stream)


def listened(
    sandbox: Sandbox, factory: BackendFactory, code: str, expected: tuple[str, str, int]
) -> tuple[list[tuple[float, str, bytes]], float] | None:
    """Run Python `code` with a listener and check its (stdout, stderr, exit code): what was heard
    and when the run ended; None on kubernetes, where nothing is heard (the pod's runner reports
    the output once, with the result)."""
    result, heard, ended = run_listening(sandbox, RunSpec("python", code))
    assert (result.stdout, result.stderr, result.exit_code) == expected
    if factory.name == "kubernetes":
        assert heard == []
        return None
    return heard, ended


def test_stderr_is_heard_as_it_is_written_though_the_end_marker_follows_on_it(
    sandbox: Sandbox, factory: BackendFactory
) -> None:
    """The backend holds back only what may be the start of the end marker (from a NUL on): a
    short line on stderr is heard at once, not with the marker at the end."""
    code = "import sys, time\nprint('err 1', file=sys.stderr, flush=True)\ntime.sleep(1.5)\nprint('out 1')"
    if (seen := listened(sandbox, factory, code, ("out 1\n", "err 1\n", 0))) is None:
        return
    heard, ended = seen
    early = b"".join(data for when, stream, data in heard if stream == "stderr" and ended - when > 1.0)
    assert early == b"err 1\n", "the stderr line was heard only as the run ended"


def test_output_is_heard_as_it_is_written(sandbox: Sandbox, factory: BackendFactory) -> None:
    code = "import sys, time\nprint('early', flush=True)\ntime.sleep(1.5)\nprint('late')\nsys.exit(4)"
    if (seen := listened(sandbox, factory, code, ("early\nlate\n", "", 4))) is None:
        return
    heard, ended = seen
    assert heard_of(heard, "stdout") == b"early\nlate\n"
    assert heard_of(heard, "stderr") == b""  # the end marker is never heard
    first_seen, _, first = heard[0]
    assert b"early\n".startswith(first) and first
    assert ended - first_seen > 1.0, "the first line was heard only as the run ended"


def test_what_is_heard_is_within_the_cap(sandbox: Sandbox, factory: BackendFactory) -> None:
    limits = Limits(output_bytes=64 * 1024)
    code = "import sys\nsys.stderr.write('e' * 10)\nwhile True:\n    print('x' * 999)"
    result, heard, _ = run_listening(sandbox, RunSpec("python", code, limits=limits))
    assert result.truncated
    if factory.name != "kubernetes":
        assert heard_of(heard, "stdout") == result.stdout.encode()
        assert len(heard_of(heard, "stdout")) == limits.output_bytes
        assert result.stderr.startswith(heard_of(heard, "stderr").decode())


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


def test_saturation_raises_busy_with_retry_after_instead_of_queueing(factory: BackendFactory) -> None:
    with factory(pool_size=1, max_concurrent=1, max_waiting_per_user=1, languages=["python"]) as sandbox:

        async def scenario() -> tuple[list[object], float]:
            slow = RunSpec("python", "import time\ntime.sleep(1.5)\nprint('slow')")
            running = asyncio.ensure_future(sandbox.backend.run(slow))
            await asyncio.sleep(0.2)
            waiting = asyncio.ensure_future(sandbox.backend.run(RunSpec("python", "print('queued')")))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(SandboxBusy) as refused:
                await sandbox.backend.run(RunSpec("python", "print('refused')"))
            refused_after = time.monotonic() - started
            assert refused.value.retry_after >= 1
            return list(await asyncio.gather(running, waiting)), refused_after

        results, refused_after = sandbox.loop.call(scenario())
        assert refused_after < 0.1  # refused at once, not queued
        assert [getattr(r, "stdout", r) for r in results] == ["slow\n", "queued\n"]
        sandbox.assert_healthy()


def test_without_a_pool_and_after_close(factory: BackendFactory) -> None:
    with factory(pool_size=0, languages=["python"]) as sandbox:
        assert sandbox.python("print(1)").stdout == "1\n"  # cold start without a pool
        sandbox.loop.call(sandbox.backend.close())
        with pytest.raises(SandboxError):
            sandbox.python("print(1)")


# -- attacks ----------------------------------------------------------------------------------------


def test_network_egress_to_a_host_listener_fails_and_only_loopback_exists(sandbox: Sandbox) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = f"""
import socket
print(sorted(name for _, name in socket.if_nameindex()))
for host in ("127.0.0.1", "localhost"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print("connected")
    except OSError as error:
        print("refused")
"""
    try:
        result = sandbox.python(code)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing reached the host
    finally:
        listener.close()
    assert result.stdout.splitlines() == ["['lo']", "refused", "refused"], result.stderr
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
        "open('/tmp/left-behind', 'w').write('x')\nopen('left-behind', 'w').write('x')\n"
        "open('/dev/shm/left-behind', 'w').write('x')\nprint('ok')"
    )
    assert first.stdout == "ok\n", first.stderr
    second = sandbox.python(
        "import os\nprint([os.path.exists(p) for p in ('/tmp/left-behind', 'left-behind', '/dev/shm/left-behind')])"
    )
    assert second.stdout == "[False, False, False]\n"


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


def test_the_data_directory_and_other_host_files_are_not_readable(sandbox: Sandbox, tmp_path: Path) -> None:
    data = tmp_path / "data"  # as `pyth-on up --data-dir` lays it out: keys, databases
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "identity.key").write_text("host secret key")
    (data / "keys" / "identity.key").chmod(0o644)
    for directory in (tmp_path, data, data / "keys"):
        directory.chmod(0o755)
    code = f"""
import os
for path in ({str(data / "keys" / "identity.key")!r}, {str(data)!r}, {os.getcwd()!r}, "/root", "/home", "/var",
             "/work", "/proc/1/root/etc/shadow"):
    try:
        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as error:
        print(path, type(error).__name__)
"""
    result = sandbox.python(code)
    assert "host secret key" not in result.stdout
    assert "['keys']" not in result.stdout and "['identity.key']" not in result.stdout
    assert f"{data / 'keys' / 'identity.key'} FileNotFoundError" in result.stdout
    sandbox.assert_healthy()


def test_another_runs_secrets_are_out_of_reach(sandbox: Sandbox) -> None:
    """While one user's run holds a secret (environment, private input, a file), another run on the
    same backend finds it nowhere it can look."""
    secret = "s3cret-of-another-user"
    holder = RunSpec(
        "python",
        "import os, time\nopen('/tmp/mine', 'w').write(os.environ['TOKEN'] + os.read(3, 100).decode())\n"
        "time.sleep(3)\nprint('held')",
        env={"TOKEN": secret},
        private_input=secret.encode(),
        files={"secret.txt": secret.encode()},
    )
    snoop = RunSpec(
        "python",
        """
import glob, os
found = []
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/fd/*") + [
        "/tmp/mine", "/workspace/secret.txt", "/dev/shm"]:
    try:
        data = open(path, "rb").read(1 << 16) if not os.path.isdir(path) else " ".join(os.listdir(path)).encode()
    except OSError:
        continue
    if b"s3cret" in data:
        found.append(path)
print(found)
""",
    )

    async def both() -> list[object]:
        holding = asyncio.ensure_future(sandbox.backend.run(holder))
        await asyncio.sleep(1.0)
        snooped = await sandbox.backend.run(snoop)
        return [await holding, snooped]

    held, snooped = sandbox.loop.call(both())
    assert getattr(held, "stdout", held) == "held\n"
    assert getattr(snooped, "stdout", snooped) == "[]\n"
    sandbox.assert_healthy()


def test_the_program_is_not_root_and_has_no_capabilities(sandbox: Sandbox) -> None:
    code = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(os.getuid(), os.geteuid(), os.getgid(), status["CapEff"].strip(), status["CapPrm"].strip())
"""
    result = sandbox.python(code)
    uid, euid, gid, cap_effective, cap_permitted = result.stdout.split()
    assert int(uid) != 0 and int(euid) != 0 and int(gid) != 0
    assert int(cap_effective, 16) == 0 and int(cap_permitted, 16) == 0
    sandbox.assert_healthy()


def test_mounting_is_refused(sandbox: Sandbox) -> None:
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None), libc.mount(b"/tmp", b"/workspace", None, 0x1000, None))
"""
    result = sandbox.python(code)
    assert result.stdout.split() == ["-1", "-1"], result.stderr
    sandbox.assert_healthy()


SOCKET_PROBE = """
import errno, json, socket
def attempt(family, kind, protocol=0):
    try:
        socket.socket(family, kind, protocol).close()
        return "ok"
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))
def pair():
    try:
        a, b = socket.socketpair()
        a.close(), b.close()
        return "ok"
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))
print(json.dumps({
    "unix": attempt(socket.AF_UNIX, socket.SOCK_STREAM), "unix pair": pair(),
    "inet": attempt(socket.AF_INET, socket.SOCK_DGRAM), "inet6": attempt(socket.AF_INET6, socket.SOCK_STREAM),
    "netlink route": attempt(socket.AF_NETLINK, socket.SOCK_RAW, 0),
    "vsock": attempt(40, socket.SOCK_STREAM), "packet": attempt(17, socket.SOCK_RAW, 0x0300),
    "alg": attempt(38, socket.SOCK_SEQPACKET), "netlink audit": attempt(socket.AF_NETLINK, socket.SOCK_RAW, 9),
    "netlink uevent": attempt(socket.AF_NETLINK, socket.SOCK_DGRAM, 15), "key": attempt(15, socket.SOCK_RAW, 2),
    "bluetooth": attempt(31, socket.SOCK_STREAM, 3), "can": attempt(29, socket.SOCK_RAW, 1),
    "xdp": attempt(44, socket.SOCK_RAW), "tipc": attempt(30, socket.SOCK_RDM),
}))
"""


def test_only_the_usual_socket_families_can_be_opened(sandbox: Sandbox, factory: BackendFactory) -> None:
    result = sandbox.python(SOCKET_PROBE)
    outcome = json.loads(result.stdout)
    allowed = ["unix", "unix pair", "inet", "inet6", "netlink route"]
    assert {name: outcome.pop(name) for name in allowed} == dict.fromkeys(allowed, "ok"), result.stderr
    if factory.name == "bwrap":  # the seccomp filter's answer
        assert outcome == dict.fromkeys(outcome, "EPERM")
    else:
        # gVisor's own kernel has none of these, except an empty uevent netlink socket it emulates
        # itself (no host socket behind it, and no device to report).
        outcome.pop("netlink uevent")
        assert "ok" not in outcome.values(), outcome
    sandbox.assert_healthy()


NETLINK_PROBE = """
import errno, json, socket, struct
ADDRESS = socket.inet_aton("10.9.9.9")
def request(kind, flags, body):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    s.bind((0, 0))
    s.send(struct.pack("IHHII", 16 + len(body), kind, 1 | flags, 1, 0) + body)
    replies = b""
    while True:
        reply = s.recv(65536)
        replies += reply
        kind_seen = struct.unpack("IHHII", reply[:16])[1]
        if kind_seen in (2, 3):  # NLMSG_ERROR (an ack or an error), NLMSG_DONE (a dump's end)
            break
    s.close()
    return replies
def addresses():
    return request(22, 0x300, struct.pack("BBBBI", socket.AF_INET, 0, 0, 0, 0))  # RTM_GETADDR, dump
# RTM_NEWADDR of 10.9.9.9/32 on lo (index 1), acknowledged: NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
body = struct.pack("BBBBI", socket.AF_INET, 32, 0, 0, 1) + struct.pack("HH4s", 8, 2, ADDRESS)
try:
    reply = request(20, 0x4 | 0x400 | 0x200, body)
    code = struct.unpack("i", reply[16:20])[0]
    write = "ok" if code == 0 else errno.errorcode.get(-code, str(code))
except OSError as error:
    write = errno.errorcode.get(error.errno, str(error.errno))
listed = addresses()
print(json.dumps({
    "read": "ok" if socket.inet_aton("127.0.0.1") in listed else "no loopback address listed",
    "write": write,
    "added": ADDRESS in listed,
}))
"""


def test_a_routing_socket_reads_but_cannot_change_the_network(sandbox: Sandbox) -> None:
    """AF_NETLINK is allowed for routing reads only (a program may list its addresses): adding an
    address is refused and nothing changes."""
    result = sandbox.python(NETLINK_PROBE)
    outcome = json.loads(result.stdout)
    assert outcome["read"] == "ok" and outcome["added"] is False, (outcome, result.stderr)
    assert outcome["write"] in ("EPERM", "EACCES", "EOPNOTSUPP"), outcome
    sandbox.assert_healthy()


CPU_HOG = """
import os, resource, time
started = time.monotonic()
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        while time.monotonic() - started < 2.0:
            pass
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
wall = time.monotonic() - started
used = resource.getrusage(resource.RUSAGE_CHILDREN)
print(round((used.ru_utime + used.ru_stime) / wall, 2))
"""


def test_a_run_gets_no_more_than_its_share_of_the_cpus(sandbox: Sandbox, factory: BackendFactory) -> None:
    """Two processes spinning for 2 s get about the run's quota (half a core here) together: their
    CPU time over the wall-clock time, as the program itself measures them (unlimited, about 2 on
    two idle cores)."""
    if factory.name == "gvisor":
        # Its kernel counts the time a throttled task waits as that task's own CPU time, so the
        # program cannot see the quota (set on the container's cgroup through the OCI spec).
        pytest.skip("gVisor's kernel reports throttled time as CPU time")
    result = sandbox.python(CPU_HOG, limits=Limits(cpus=0.5))
    assert result.exit_code == 0, result.stderr
    assert 0.2 < float(result.stdout) <= 0.6, result.stdout
    sandbox.assert_healthy()


# -- what the root holds --------------------------------------------------------------------------


def test_time_zones_work_in_every_language(sandbox: Sandbox) -> None:
    python = sandbox.python(
        "import datetime, zoneinfo\n"
        "print(datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo('Asia/Shanghai')).utcoffset())"
    )
    assert (python.stdout, python.stderr) == ("8:00:00\n", "")
    needs(sandbox, "bash")
    bash = sandbox.run(RunSpec("bash", "TZ=Asia/Shanghai date -d @0 '+%Y-%m-%d %H:%M %Z'"))
    assert (bash.stdout, bash.stderr) == ("1970-01-01 08:00 CST\n", "")
    needs(sandbox, "javascript")
    code = "console.log(new Date(0).toLocaleString('en-GB', {timeZone: 'Asia/Shanghai'}))"
    node = sandbox.run(RunSpec("javascript", code, env={"TZ": "Asia/Shanghai"}))
    assert (node.stdout, node.stderr) == ("01/01/1970, 08:00:00\n", "")


def test_bash_runs_can_call_python3_node_and_the_usual_tools(
    sandbox: Sandbox, factory: BackendFactory
) -> None:
    needs(sandbox, "bash")
    code = """
python3 -c 'import sys; print("python", sys.version_info[0])'
command -v node >/dev/null && node -e 'console.log("node", typeof process)' || echo "node missing"
printf 'b\\na\\n' | sort | head -1
echo 'x y' | awk '{print $2}' | sed s/y/z/ | tr z Z
seq 3 | paste -sd+ | bc
echo hello | sha256sum | cut -c1-8
"""
    result = sandbox.run(RunSpec("bash", code))
    expected_node = "node object" if "javascript" in sandbox.backend.languages() else "node missing"
    expected = ["python 3", expected_node, "a", "Z", "6", "5891b5b5"]
    if factory.name == "gvisor":
        # Under this host's runsc (2022, ptrace), a run of coreutils pipelines ends now and then with
        # status 2 and the rest of its output missing (about 1 run in 4; README, "Not yet verified"):
        # only the interpreters are held to the contract there.
        expected = expected[:2]
        assert result.stdout.splitlines()[:2] == expected, result.stderr
        return
    assert result.stdout.splitlines() == expected, result.stderr


def test_the_root_holds_only_what_the_runtime_needs(sandbox: Sandbox) -> None:
    """Libraries the runtime does not link (the JVM, PostgreSQL's, other host software under
    /usr/lib) are not there; those it does are."""
    code = """
import json, os
host_software = ["/usr/lib/jvm", "/usr/lib/postgresql", "/usr/lib/google-cloud-sdk", "/usr/lib/llvm-14",
                 "/usr/lib/python3", "/usr/share/doc", "/usr/lib/x86_64-linux-gnu/libpq.so.5"]
print(json.dumps({"present": [p for p in host_software if os.path.exists(p)],
                  "libc": os.path.exists("/usr/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/lib/libc.so.6")}))
"""
    result = sandbox.python(code)
    seen = json.loads(result.stdout)
    assert seen == {"present": [], "libc": True}, result.stderr


def test_mountinfo_shows_no_path_of_the_mesh(sandbox: Sandbox, tmp_path: Path) -> None:
    """No host path of the executor's own (its runtime directory, the temporary directory's
    pythonon-* folders, the data directory, the repository) appears in what the program can read
    about its mounts, nor in the command line of any process it can see (bwrap's own included)."""
    code = (
        "import os\nprint(open('/proc/self/mountinfo').read())\nprint(open('/proc/self/cgroup').read())\n"
        "for pid in sorted(p for p in os.listdir('/proc') if p.isdigit()):\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = sandbox.python(code, env={"PYTHONPATH": "/opt/env"}, readonly_paths=[])
    assert result.exit_code == 0, result.stderr
    mounts, _, commands = result.stdout.partition("\n1 ")
    assert commands, result.stdout  # process 1 (bwrap's, or the program itself) was listed
    for marker in ("pythonon-", str(tmp_path), os.getcwd(), "/work/", "/tmp/"):
        assert marker not in mounts, marker
        # The program's own command line holds the sandbox's bootstrap, which names "pythonon-".
        if marker != "pythonon-":
            assert marker not in commands, (marker, commands[:2000])
    sandbox.assert_healthy()


# -- encrypted code (issue 12): decrypted inside the sandbox only ---------------------------------------

# Small key-derivation parameters keep the suite fast; the recipe is the same at any size.
ZK_KDF = recipe.KdfParams(memory_kib=8 * 1024, iterations=1, parallelism=1)
ZK_PASSWORD = "zk contract pass phrase"
ZK_PROGRAMS = {
    "python": (
        "import os, sys\n"
        "print('clear', sys.stdin.read().strip(), os.environ['WHO'], __name__, sorted(os.listdir('/proc/self/fd')))\n"
        "print(open('/proc/self/environ','rb').read().count(b'zk contract'), open('/proc/self/cmdline','rb').read().count(b'zk contract'))\n"
        "print(sum('zk contract' in value for value in os.environ.values()), 'zk contract' in repr(globals()))\n"
    ),
    "javascript": (
        "const fs = require('fs');\n"
        "console.log('clear', fs.readFileSync(0, 'utf8').trim(), process.env.WHO, require.main === module,"
        " fs.readdirSync('/workspace').join(','));\n"
    ),
    "bash": 'read -r line\necho "clear $line $WHO $0: $(head -1 "$0")"\nexit 3\n',
}
ZK_EXPECTED = {
    "python": ("clear in zk __main__ ['0', '1', '2', '3']\n0 0\n0 False\n", 0),
    "javascript": ("clear in zk true main.js\n", 0),
    "bash": ("clear in zk /workspace/main.sh: read -r line\n", 3),
}


def sealed(code: str, password: str = ZK_PASSWORD) -> encrypted_runs.SealedCode:
    return encrypted_runs.SealedCode(recipe.encrypt(code, ZK_PASSWORD, ZK_KDF), password)


@pytest.mark.parametrize("language", ["python", "javascript", "bash"])
def test_encrypted_code_is_decrypted_and_run_inside_the_sandbox(sandbox: Sandbox, language: str) -> None:
    needs(sandbox, encrypted_runs.DECRYPTING_RUNTIME[language])
    needs(sandbox, language)
    code = sealed(ZK_PROGRAMS[language])
    plain = RunSpec(language, "", stdin="in\n", env={"WHO": "zk"})
    spec = code.spec(plain, sandbox.backend.languages())
    assert ZK_PROGRAMS[language] not in spec.code and ZK_PASSWORD not in spec.code
    assert all(ZK_PASSWORD not in value for value in spec.env.values())
    result = sandbox.run(spec)
    assert code.refusal(result) is None, result.stderr
    assert (result.stdout, result.stderr, result.exit_code) == (
        *ZK_EXPECTED[language][:1],
        "",
        ZK_EXPECTED[language][1],
    )


@pytest.mark.parametrize("parallelism", [2, 4])
def test_encrypted_code_of_several_lanes_decrypts_and_a_wrong_password_is_refused(
    sandbox: Sandbox, parallelism: int
) -> None:
    """Argon2id with parallelism above 1 ends its threads with pthread_exit, for which glibc loads
    libgcc_s at run time (no ldd of a runtime lists it): without it in the root, every such run
    aborted (134) with "libgcc_s.so.1 must be installed", a wrong password's too."""
    needs(sandbox, encrypted_runs.DECRYPTING_RUNTIME["python"])
    kdf = replace(ZK_KDF, parallelism=parallelism)
    for password, expected in ((ZK_PASSWORD, "lanes ok"), ("not the password", None)):
        code = encrypted_runs.SealedCode(recipe.encrypt("print('lanes ok')", ZK_PASSWORD, kdf), password)
        result = sandbox.run(code.spec(RunSpec("python", ""), sandbox.backend.languages()))
        if expected is None:
            refusal = code.refusal(result)
            assert refusal is not None and refusal[0] == "wrong-password", result
        else:
            assert (code.refusal(result), result.stdout, result.stderr) == (None, "lanes ok\n", ""), result


def test_an_encrypted_programs_traceback_is_its_own(sandbox: Sandbox) -> None:
    code = sealed("def divide(x):\n    return x / 0\n\ndivide(1)\n")
    result = sandbox.run(code.spec(RunSpec("python", ""), sandbox.backend.languages()))
    assert result.exit_code == 1 and code.refusal(result) is None
    assert result.stderr == (
        "Traceback (most recent call last):\n"
        '  File "/workspace/main.py", line 4, in <module>\n'
        "    divide(1)\n"
        '  File "/workspace/main.py", line 2, in divide\n'
        "    return x / 0\n"
        "           ~~^~~\n"
        "ZeroDivisionError: division by zero\n"
    )


@pytest.mark.parametrize("language", ["python", "javascript"])
def test_a_wrong_password_or_altered_payload_is_refused_and_the_code_never_runs(
    sandbox: Sandbox, language: str
) -> None:
    needs(sandbox, encrypted_runs.DECRYPTING_RUNTIME[language])
    needs(sandbox, language)
    program = {"python": "print('RAN')", "javascript": "console.log('RAN')"}[language]
    wrong = sealed(program, password="not the password")
    good = sealed(program)
    flipped = bytearray(good.payload.ciphertext)
    flipped[0] ^= 1
    altered = encrypted_runs.SealedCode(replace(good.payload, ciphertext=bytes(flipped)), ZK_PASSWORD)
    for code in (wrong, altered):
        result = sandbox.run(code.spec(RunSpec(language, ""), sandbox.backend.languages()))
        refusal = code.refusal(result)
        assert refusal is not None, (result.stdout, result.stderr)
        reason, error = refusal
        assert (reason, error.message) == (
            "wrong-password",
            "the password is wrong or the payload was altered",
        )
        assert "RAN" not in result.stdout and result.exit_code == zk_decryptor.REFUSED_STATUS
        # Another run's token does not make the same output a refusal.
        assert sealed(program).refusal(result) is None


def test_the_key_derivation_counts_against_the_runs_memory(sandbox: Sandbox) -> None:
    code = encrypted_runs.SealedCode(
        recipe.encrypt("print('RAN')", ZK_PASSWORD, recipe.KdfParams(96 * 1024, 1, 1)), ZK_PASSWORD
    )
    limits = Limits(memory_bytes=48 * 1024 * 1024)
    result = sandbox.run(code.spec(RunSpec("python", "", limits=limits), sandbox.backend.languages()))
    assert "RAN" not in result.stdout
    refusal = code.refusal(result)
    # Refused by the decryptor (Argon2 could not allocate) or killed by the memory limit: never run.
    assert (refusal is not None and refusal[0] == "kdf-memory") or (
        result.exit_code == 137 and "memory limit of 48 MiB exceeded" in result.stderr
    ), (result.exit_code, result.stderr)
