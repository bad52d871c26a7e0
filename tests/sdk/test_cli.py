"""The `pyth-on` command line, run as a user runs it (the venv's console script, a subprocess) with
PYTHONON_URL and PYTHONON_API_KEY pointing at a whole mesh: the exit status of `run`, secrets read
from stdin and never from an argument, the build progress of packages, zk with the password on a file
descriptor, generate, audit, and `login`'s 0600 config file; and both packages under one command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.runner.mesh import Mesh
from tests.anthropic_stub import AnthropicStub, structured_answer
from tests.sdk.conftest import register, stream_endpoint_missing

COMMAND = str(Path(sys.executable).parent / "pyth-on")
ZK_PASSWORD = "a zk pass phrase"
FAST_KDF = ["--memory-kib", "8192", "--iterations", "1"]


def pyth_on(
    mesh: Mesh,
    home: Path,
    *args: str,
    key: str | None = None,
    stdin: str = "",
    pass_fds: tuple[int, ...] = (),
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    """The CLI in a clean environment: the mesh's URL, the key (if any), a home of the test's own."""
    return subprocess.run(
        [COMMAND, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(mesh, home, key),
        cwd=home,
        pass_fds=pass_fds,
        start_new_session=new_session,  # True: no controlling terminal, as under CI or cron
        timeout=180,
    )


def cli_env(mesh: Mesh, home: Path, key: str | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHONON_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"), PYTHONON_URL=mesh.url)
    if key is not None:
        env["PYTHONON_API_KEY"] = key
    return env


def password_fd(password: str) -> int:
    """A pipe's read end holding the password, to pass as --password-fd."""
    read, write = os.pipe()
    os.write(write, password.encode() + b"\n")
    os.close(write)
    return read


@pytest.fixture()
def key(sdk_mesh: Mesh) -> str:
    return register(sdk_mesh, "cli")["apiKey"]


def test_run_exits_with_the_programs_status(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    (tmp_path / "job.py").write_text(
        "import sys\nprint('got:', sys.stdin.read())\nprint('warn', file=sys.stderr)\nsys.exit(7)\n"
    )
    (tmp_path / "in.txt").write_text("hello")
    ran = pyth_on(sdk_mesh, tmp_path, "run", "job.py", "--stdin", "in.txt", key=key)
    assert (ran.returncode, ran.stdout, ran.stderr) == (7, "got: hello\n", "warn\n")

    (tmp_path / "ok.sh").write_text("echo $((6*7)) $GREETING\n")
    bash = pyth_on(sdk_mesh, tmp_path, "run", "ok.sh", "--env", "GREETING=hi", key=key)  # bash, by its suffix
    assert (bash.returncode, bash.stdout) == (0, "42 hi\n")
    piped = pyth_on(sdk_mesh, tmp_path, "run", "-", key=key, stdin="print('from stdin')")
    assert (piped.returncode, piped.stdout) == (0, "from stdin\n")
    slow = pyth_on(
        sdk_mesh, tmp_path, "run", "-", "--timeout", "1", key=key, stdin="import time; time.sleep(5)"
    )
    assert slow.returncode != 0 and "pyth-on: the run timed out\n" in slow.stderr

    refused = pyth_on(sdk_mesh, tmp_path, "run", "job.py", "--language", "ruby", key=key)
    assert refused.returncode == 125  # the API failed, not the program
    assert (
        refused.stderr == "pyth-on: unknown language 'ruby'; use one of python, javascript, bash (HTTP 400)\n"
    )
    missing = pyth_on(sdk_mesh, tmp_path, "run", "nowhere.py", key=key)
    assert missing.returncode == 2 and "cannot read nowhere.py" in missing.stderr
    no_key = pyth_on(sdk_mesh, tmp_path, "run", "job.py")
    assert no_key.returncode == 2
    assert no_key.stderr == "pyth-on: no API key: set PYTHONON_API_KEY, or run `pyth-on login`\n"


def test_run_stream_prints_as_it_goes(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    reason = stream_endpoint_missing(sdk_mesh, key)
    if reason:
        pytest.skip(reason)
    (tmp_path / "job.py").write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n")
    ran = pyth_on(sdk_mesh, tmp_path, "run", "job.py", "--stream", key=key)
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "out\n", "err\n")
    # As it goes: the first line is printed while the program still sleeps.
    (tmp_path / "slow.py").write_text(
        "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')\n"
    )
    with subprocess.Popen(
        [COMMAND, "run", "slow.py", "--stream"],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(sdk_mesh, tmp_path, key),
        cwd=tmp_path,
    ) as running:
        assert running.stdout is not None
        assert running.stdout.readline() == "first\n"
        first_at = time.monotonic()
        assert running.stdout.readline() == "second\n"
        assert time.monotonic() - first_at > 2.0  # the first line came ~3 s before the second
        assert running.wait(timeout=30) == 0


def test_secrets_set_from_stdin_list_and_delete(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    stored = pyth_on(
        sdk_mesh, tmp_path, "secrets", "set", "API_TOKEN", "--description", "ci", key=key, stdin="tok-value\n"
    )
    assert (stored.returncode, stored.stdout) == (0, "API_TOKEN: version 1\n")
    printed = pyth_on(
        sdk_mesh, tmp_path, "run", "-", key=key, stdin="import os; print(repr(os.environ['API_TOKEN']))"
    )
    assert printed.stdout == "'tok-value'\n"  # the one trailing newline of stdin dropped

    as_argument = pyth_on(sdk_mesh, tmp_path, "secrets", "set", "API_TOKEN", "tok-value", key=key)
    assert as_argument.returncode == 2 and "unrecognized arguments: tok-value" in as_argument.stderr

    listed = pyth_on(sdk_mesh, tmp_path, "secrets", "list", key=key)
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and lines[0].split() == ["NAME", "VERSION", "UPDATED", "DESCRIPTION"]
    assert lines[1].split()[:2] == ["API_TOKEN", "1"] and lines[1].endswith("ci") and len(lines) == 2
    assert "tok-value" not in listed.stdout

    deleted = pyth_on(sdk_mesh, tmp_path, "secrets", "delete", "API_TOKEN", key=key)
    assert (deleted.returncode, deleted.stdout) == (0, "deleted API_TOKEN\n")
    again = pyth_on(sdk_mesh, tmp_path, "secrets", "delete", "API_TOKEN", key=key)
    assert (again.returncode, again.stderr) == (1, "pyth-on: no secret named API_TOKEN (HTTP 404)\n")


def test_packages_show_the_builds_progress(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    added = pyth_on(sdk_mesh, tmp_path, "packages", "add", "tiny-greet>=1.1", "tiny-other==0.3", key=key)
    assert added.returncode == 0, added.stderr
    progress = added.stderr.splitlines()
    assert progress[-1] == "building the environment: 2 of 2 ready"
    assert all(line.startswith("building the environment: ") for line in progress)
    rows = [line.split() for line in added.stdout.splitlines()]
    assert rows == [
        ["NAME", "SPEC", "VERSION", "STATUS", "REASON"],
        ["tiny-greet", "tiny-greet>=1.1", "1.2", "ready"],
        ["tiny-other", "tiny-other==0.3", "0.3", "ready"],
    ]
    failing = pyth_on(sdk_mesh, tmp_path, "packages", "add", "tiny-sdist-only", key=key)
    assert failing.returncode == 1  # a build that failed
    assert "failed" in failing.stderr.splitlines()[-1]
    assert any(
        line.startswith("tiny-sdist-only") and " failed " in line for line in failing.stdout.splitlines()
    )

    removed = pyth_on(sdk_mesh, tmp_path, "packages", "remove", "tiny-sdist-only", "tiny-other", key=key)
    assert removed.returncode == 0, removed.stderr
    listed = pyth_on(sdk_mesh, tmp_path, "packages", "list", key=key)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "tiny-greet"]
    bad = pyth_on(sdk_mesh, tmp_path, "packages", "add", "--no-wait", "../local/path", key=key)
    assert bad.returncode == 1 and bad.stderr.startswith("pyth-on: ") and "(HTTP 400)" in bad.stderr


def test_a_password_without_a_terminal_or_descriptor_is_a_clear_usage_error(
    sdk_mesh: Mesh, tmp_path: Path, key: str
) -> None:
    """No terminal to ask on (a pipe, CI) and no --password-fd: a message saying what to give, not
    getpass's warning and an EOFError traceback; nothing is stored."""
    (tmp_path / "job.py").write_text("print('never stored')\n")
    put = pyth_on(sdk_mesh, tmp_path, "zk", "put", "job.py", "job.py", key=key, new_session=True)
    assert (put.returncode, put.stdout, put.stderr) == (
        2,  # a usage error
        "",
        "pyth-on: no terminal to ask for it (Password): give --password-fd N, e.g. --password-fd 3 3<file\n",
    )
    listed = pyth_on(sdk_mesh, tmp_path, "zk", "list", key=key)
    assert (listed.returncode, "job.py" in listed.stdout) == (0, False)


def test_zk_put_run_list_delete_with_the_password_on_a_descriptor(
    sdk_mesh: Mesh, tmp_path: Path, key: str
) -> None:
    (tmp_path / "calc.py").write_text(
        "import sys\nprint('sum', sum(map(int, sys.stdin.read().split())))\nsys.exit(9)\n"
    )
    (tmp_path / "numbers.txt").write_text("1 2 3")
    fd = password_fd(ZK_PASSWORD)
    put = pyth_on(
        sdk_mesh,
        tmp_path,
        "zk",
        "put",
        "calc.py",
        "calc.py",
        "--password-fd",
        str(fd),
        *FAST_KDF,
        key=key,
        pass_fds=(fd,),
    )
    os.close(fd)
    assert put.returncode == 0, put.stderr
    assert put.stdout.startswith("calc.py: python, ") and " bytes of ciphertext, sha256 " in put.stdout

    fd = password_fd(ZK_PASSWORD)
    ran = pyth_on(
        sdk_mesh,
        tmp_path,
        "zk",
        "run",
        "calc.py",
        "--stdin",
        "numbers.txt",
        "--password-fd",
        str(fd),
        key=key,
        pass_fds=(fd,),
    )
    os.close(fd)
    assert (ran.returncode, ran.stdout) == (9, "sum 6\n")
    fd = password_fd("wrong")
    wrong = pyth_on(
        sdk_mesh, tmp_path, "zk", "run", "calc.py", "--password-fd", str(fd), key=key, pass_fds=(fd,)
    )
    os.close(fd)
    assert (wrong.returncode, wrong.stdout) == (125, "")
    assert wrong.stderr == "pyth-on: the password is wrong or the payload was altered (HTTP 403)\n"

    listed = pyth_on(sdk_mesh, tmp_path, "zk", "list", key=key)
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        ["NAME", "LANGUAGE"],
        ["calc.py", "python"],
    ]
    deleted = pyth_on(sdk_mesh, tmp_path, "zk", "delete", "calc.py", key=key)
    assert (deleted.returncode, deleted.stdout) == (0, "deleted calc.py\n")


def test_generate_prints_the_code_or_runs_it(
    sdk_mesh: Mesh, tmp_path: Path, key: str, stub: AnthropicStub
) -> None:
    answer = {"code": "import sys\nprint(6 * 7)\nsys.exit(3)", "packages": [], "explanation": "Answers."}
    stub.reply(structured_answer(answer), structured_answer(answer))
    written = pyth_on(sdk_mesh, tmp_path, "generate", "print six times seven", key=key)
    assert (written.returncode, written.stdout) == (0, "import sys\nprint(6 * 7)\nsys.exit(3)\n")
    ran = pyth_on(sdk_mesh, tmp_path, "generate", "print six times seven", "--execute", key=key)
    assert (ran.returncode, ran.stdout) == (3, "42\n")
    assert "print(6 * 7)" in ran.stderr  # the code, for the reader, beside the output
    empty = pyth_on(sdk_mesh, tmp_path, "generate", "", key=key)
    assert empty.returncode == 125 and "(HTTP 400)" in empty.stderr


def test_audit_lists_and_verifies(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    for n in range(3):
        assert pyth_on(sdk_mesh, tmp_path, "run", "-", key=key, stdin=f"print({n})").returncode == 0
    listed = pyth_on(sdk_mesh, tmp_path, "audit", "--limit", "2", key=key)
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and lines[0].split() == [
        "SEQ",
        "TIME",
        "(UTC)",
        "ACTION",
        "RESOURCE",
        "OUTCOME",
    ]
    assert len(lines) == 3 and all(line.split()[3] == "executor.execute" for line in lines[1:])
    as_json = pyth_on(
        sdk_mesh, tmp_path, "audit", "--json", "--action", "executor.execute", "--page-size", "2", key=key
    )
    entries = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(entries) == 3 and {entry["action"] for entry in entries} == {"executor.execute"}
    verified = pyth_on(sdk_mesh, tmp_path, "audit", "--verify", key=key)
    assert verified.returncode == 0
    assert verified.stdout.startswith("the chain is intact: 4 entries, head ")  # register and three runs


def test_login_stores_the_key_readable_by_its_owner_only(sdk_mesh: Mesh, tmp_path: Path) -> None:
    account = register(sdk_mesh, "login")
    fd = password_fd(account["password"])
    login = pyth_on(
        sdk_mesh, tmp_path, "login", "--email", account["email"], "--password-fd", str(fd), pass_fds=(fd,)
    )
    os.close(fd)
    assert login.returncode == 0, login.stderr
    config = tmp_path / "config" / "pyth-on" / "config.json"
    assert (
        login.stdout
        == f"logged in to {sdk_mesh.url} as {account['email']}; the key is in {config} (readable by you only)\n"
    )
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert json.loads(config.read_text()) == {"url": sdk_mesh.url, "api_key": account["apiKey"]}
    assert [p.name for p in config.parent.iterdir()] == ["config.json"]  # no temporary file left
    assert account["password"] not in config.read_text()

    # No PYTHONON_API_KEY now: the stored key is used; the environment's wins when it is set.
    assert pyth_on(sdk_mesh, tmp_path, "secrets", "list").returncode == 0
    overridden = pyth_on(sdk_mesh, tmp_path, "secrets", "list", key="po_not-a-key")
    assert overridden.returncode == 1 and "(HTTP 401)" in overridden.stderr

    config.chmod(0o644)
    exposed = pyth_on(sdk_mesh, tmp_path, "secrets", "list")
    assert exposed.returncode == 2 and "may be read by other users; run `chmod 600" in exposed.stderr
    config.chmod(0o600)

    logout = pyth_on(sdk_mesh, tmp_path, "logout")
    assert (logout.returncode, logout.stdout) == (0, f"removed {config}\n") and not config.exists()
    pasted = pyth_on(sdk_mesh, tmp_path, "login", stdin="po_not-a-key\n")
    assert pasted.returncode == 1 and "(HTTP 401)" in pasted.stderr and not config.exists()
    good = pyth_on(sdk_mesh, tmp_path, "login", stdin=account["apiKey"] + "\n")
    assert good.returncode == 0 and json.loads(config.read_text())["api_key"] == account["apiKey"]


def test_one_command_for_the_server_and_the_client(sdk_mesh: Mesh, tmp_path: Path, key: str) -> None:
    """The SDK's script runs the server's `up` and `migrate`; the server's runs the client's commands."""
    migrate = pyth_on(sdk_mesh, tmp_path, "migrate", "--help")
    assert migrate.returncode == 0 and migrate.stdout.startswith("usage: pyth-on migrate")
    version = pyth_on(sdk_mesh, tmp_path, "--version")
    assert version.stdout == "pyth-on-client 0.1.0\npyth-on 0.1.0\n"

    env = {**os.environ, "PYTHONON_URL": sdk_mesh.url, "PYTHONON_API_KEY": key}
    server_script = [sys.executable, "-m", "services.runner.cli"]
    ran = subprocess.run(
        [*server_script, "run", "-"],
        input="print('via the server')\nraise SystemExit(4)",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (ran.returncode, ran.stdout) == (4, "via the server\n")
    bogus = subprocess.run([*server_script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert bogus.returncode == 0 and "pyth-on-client" in bogus.stdout
