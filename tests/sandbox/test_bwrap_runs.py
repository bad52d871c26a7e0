"""What an ordinary program gets from the bwrap backend: its output, input, environment, files,
private input, exit status and tracebacks as a plain interpreter would give them, and a warm start."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from services.executor.sandbox import Limits, RunSpec, SandboxBusy, SandboxError
from tests.sandbox.conftest import Sandbox, started_backend


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
    assert result.stdout == "from the package\nOSError\n", result.stderr
    assert not (package / "new.py").exists()


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
    if "javascript" not in sandbox.backend.languages():
        pytest.skip("node is not available on this host")
    code = (
        "const fs = require('fs');\n"
        "console.log('hi', process.env.WHO, fs.readFileSync(0, 'utf8').trim(), require.main === module)"
    )
    result = sandbox.run(RunSpec("javascript", code, env={"WHO": "js"}, stdin="in"))
    assert (result.stdout, result.exit_code) == ("hi js in true\n", 0), result.stderr
    failing = sandbox.run(RunSpec("javascript", "process.exitCode = 4; throw new Error('boom')"))
    assert failing.exit_code == 1 and "Error: boom" in failing.stderr and "main.js" in failing.stderr


def test_bash_hello_world(sandbox: Sandbox) -> None:
    if "bash" not in sandbox.backend.languages():
        pytest.skip("bash is not available on this host")
    code = "read -r line\necho \"hi $WHO $line $(sh -c 'echo $WHO') $(cat data.txt | wc -c)\"\nexit 5"
    result = sandbox.run(
        RunSpec("bash", code, env={"WHO": "bash user"}, stdin="in\n", files={"data.txt": b"12345"})
    )
    assert (result.stdout, result.exit_code) == ("hi bash user in bash user 5\n", 5), result.stderr


def test_invalid_specs_are_refused_before_running(sandbox: Sandbox) -> None:
    for spec in (
        RunSpec("cobol", "DISPLAY 'HI'."),
        RunSpec("python", "print(1)", files={"../escape": b""}),
        RunSpec("python", "print(1)", files={"main.py": b""}),
        RunSpec("python", "print(1)", env={"A=B": "c"}),
    ):
        with pytest.raises(ValueError):
            sandbox.run(spec)


def test_saturation_raises_busy_with_retry_after_instead_of_queueing() -> None:
    with started_backend(
        "bwrap", pool_size=1, max_concurrent=1, max_waiting=1, languages=["python"]
    ) as sandbox:

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
        assert [r.stdout for r in results] == ["slow\n", "queued\n"]  # type: ignore[attr-defined]
        sandbox.assert_healthy()


def test_warm_start_is_faster_than_a_bare_interpreter(sandbox: Sandbox) -> None:
    """The pool's point: a hello-world run costs less than starting `python3 -I -S` at all."""
    import subprocess

    def median(samples: list[float]) -> float:
        return sorted(samples)[len(samples) // 2]

    bare = []
    for _ in range(9):
        started = time.perf_counter()
        subprocess.run([os.path.realpath(sys.executable), "-I", "-S", "-c", "pass"], check=True)
        bare.append(time.perf_counter() - started)
    warm = []
    for _ in range(9):
        time.sleep(0.05)  # let the pool refill, as between requests
        started = time.perf_counter()
        assert sandbox.python("print('hello')").stdout == "hello\n"
        warm.append(time.perf_counter() - started)
    assert median(warm) < median(bare), (median(warm), median(bare))


def test_closed_backend_refuses_runs() -> None:
    with started_backend("bwrap", pool_size=0, languages=["python"]) as sandbox:
        assert sandbox.python("print(1)").stdout == "1\n"  # cold start without a pool
        sandbox.loop.call(sandbox.backend.close())
        with pytest.raises(SandboxError):
            sandbox.python("print(1)")
