"""Hostile code sent through Envoy to a whole mesh: each attack must fail (or be contained), and the
very next run on the same mesh must answer normally while /health stays 200.

The sandbox's behaviour does not depend on the database, so the attacks that can share a mesh use
the session's SQLite mesh only; the canary and the saturation tests start meshes of their own."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.runner.mesh import Mesh, MeshConfig
from tests.host_processes import no_process_left
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email

# The attacks share the session's SQLite mesh (the sandbox does not depend on the database).
on_one_mesh = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)
SAFE_ENV_NAMES = {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


def execute(client: httpx.Client, user: dict, **body: object) -> httpx.Response:
    return client.post("/api/v1/execute", json=body, headers={"x-api-key": user["apiKey"]})


def ran(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"output", "error", "exitCode", "durationMs", "timedOut", "truncated", "executionId"}
    return body


def timed(client: httpx.Client, user: dict, **body: object) -> tuple[dict, float]:
    """The run's response and the wall-clock seconds the request took."""
    started = time.monotonic()
    response = execute(client, user, **body)
    return ran(response), time.monotonic() - started


def assert_answers_normally(client: httpx.Client, user: dict) -> None:
    """After an attack: the next run on the same mesh answers normally and the mesh is healthy."""
    body = ran(execute(client, user, code="print('ok')"))
    assert (body["output"], body["error"], body["exitCode"], body["timedOut"], body["truncated"]) == (
        "ok\n",
        "",
        0,
        False,
        False,
    )
    health = client.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"


def register(client: httpx.Client, tag: str) -> dict:
    response = client.post("/api/register", json={"email": new_email(tag), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()


def info(client: httpx.Client) -> dict:
    response = client.get("/api/info")
    assert response.status_code == 200
    return response.json()


# -- resource exhaustion ---------------------------------------------------------------------------

FORK_BOMB = """
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


@on_one_mesh
def test_a_fork_bomb_is_held_to_the_process_limit(client: httpx.Client, user: dict) -> None:
    body, elapsed = timed(client, user, code=FORK_BOMB)
    assert body["exitCode"] == 0, body
    uid, refused = body["output"].splitlines()
    words = refused.split()
    assert words[:2] == ["refused", "after"] and int(words[2]) < 64 and words[3] == "11", body  # EAGAIN
    assert elapsed < 10
    assert no_process_left(int(uid))  # the sleeping children died with the sandbox
    assert_answers_normally(client, user)


@on_one_mesh
def test_a_shell_fork_bomb_is_contained(client: httpx.Client, user: dict) -> None:
    offered = info(client)["languages"]
    if "bash" not in offered:
        pytest.skip(f"bash is not offered on this host (GET /api/info lists {', '.join(offered)})")
    body, elapsed = timed(client, user, code="id -u\n:(){ :|:& };:\nwait", language="bash", timeout=2)
    assert re.fullmatch(r"\d+\n", body["output"]), body  # the script did start
    assert elapsed < 5
    # Held by the process limit (bash's fork messages), by the timeout, or ended first: `wait`
    # answers 0 at once (the bomb's processes are not the shell's children), the run ends at the
    # bootstrap's end marker and the sandbox, bomb and all, is killed.
    contained = body["timedOut"] or "fork: retry: Resource temporarily unavailable" in body["error"]
    assert contained or (body["exitCode"], body["error"]) == (0, ""), body
    assert no_process_left(int(body["output"]))
    assert_answers_normally(client, user)


@on_one_mesh
def test_a_memory_bomb_ends_that_run_with_a_clear_result(client: httpx.Client, user: dict) -> None:
    body, elapsed = timed(client, user, code="data = b'x' * (1 << 30)\nprint('allocated', len(data))")
    assert "allocated" not in body["output"]
    assert body["timedOut"] is False and elapsed < 10
    if info(client)["enforcedLimits"]["memory"]:
        assert (body["exitCode"], body["error"]) == (137, "[sandbox] memory limit of 256 MiB exceeded\n")
    else:
        assert body["exitCode"] == 1 and body["error"].endswith("MemoryError\n"), body
    assert_answers_normally(client, user)


@on_one_mesh
def test_a_cpu_spin_times_out_within_a_second_of_the_limit(client: httpx.Client, user: dict) -> None:
    body, elapsed = timed(
        client, user, code="print('spinning', flush=True)\nwhile True:\n    pass", timeout=1
    )
    assert (body["timedOut"], body["exitCode"], body["truncated"]) == (True, 137, False)
    assert body["output"] == "spinning\n"  # what it printed before is kept
    assert body["error"] == "[sandbox] execution timed out after 1 s\n"
    assert 1000 <= body["durationMs"] < 2000
    assert elapsed < 3
    assert_answers_normally(client, user)


@on_one_mesh
def test_a_spinning_child_dies_with_the_timed_out_run(client: httpx.Client, user: dict) -> None:
    code = """
import os, time
print(os.getuid(), flush=True)
for _ in range(4):
    if os.fork() == 0:
        os.setsid()  # out of the program's process group: the sandbox must still kill it
        while True:
            pass
time.sleep(60)
"""
    body, elapsed = timed(client, user, code=code, timeout=1)
    assert body["timedOut"] is True and elapsed < 3
    assert no_process_left(int(body["output"]))
    assert_answers_normally(client, user)


FILL = """
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
print(*fill("{directory}/big", 200))                             # one file of 200 MiB
results = [fill(f"{directory}/part{{i}}", 8) for i in range(25)]  # 200 MiB in files of 8 MiB
print(sum(w for w, _ in results), results[-1][1])
open("{directory}/last", "wb").write(chunk)                     # and once more, uncaught
"""


@on_one_mesh
@pytest.mark.parametrize("directory", ["/tmp", "/workspace"])
def test_filling_the_disk_is_contained(client: httpx.Client, user: dict, directory: str) -> None:
    body, elapsed = timed(client, user, code=FILL.format(directory=directory))
    first, second = body["output"].splitlines()
    assert first == "16 EFBIG", body  # the 16 MiB file-size limit
    written, error = second.split()
    assert error == "ENOSPC" and int(written) < 64, body  # the 64 MiB tmpfs
    assert body["exitCode"] == 1
    assert body["error"].endswith("OSError: [Errno 28] No space left on device\n"), body
    assert elapsed < 10
    # The next run gets an empty, full-size directory again.
    listing = "import os\nprint(sorted(os.listdir('{d}')))\nopen('{d}/x', 'wb').write(b'y' * (15 << 20))"
    again = ran(execute(client, user, code=listing.format(d=directory)))
    expected = ["main.py"] if directory == "/workspace" else []
    assert (again["output"], again["error"], again["exitCode"]) == (f"{expected}\n", "", 0)
    assert_answers_normally(client, user)


@on_one_mesh
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_forever_is_cut_quickly(client: httpx.Client, user: dict, stream: str) -> None:
    started = time.monotonic()
    response = execute(client, user, code=f"import sys\nwhile True:\n    print('x' * 999, file=sys.{stream})")
    elapsed = time.monotonic() - started
    body = ran(response)
    assert (body["truncated"], body["timedOut"], body["exitCode"]) == (True, False, 137)
    flood = body["output" if stream == "stdout" else "error"]
    assert (1 << 20) - 1000 <= len(flood.encode()) <= (1 << 20) + 200  # the cap (plus the note on stderr)
    assert "[sandbox] output limit of 1 MiB per stream exceeded; the run was stopped\n" in body["error"]
    assert elapsed < 5
    assert_answers_normally(client, user)


# -- the network -----------------------------------------------------------------------------------


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@on_one_mesh
def test_no_network_but_an_isolated_loopback(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(1)
    port = listener.getsockname()[1]
    # The test's listener, the edge itself and the secrets service (which holds every user's values).
    targets = [
        ("127.0.0.1", port),
        ("localhost", port),
        ("127.0.0.1", _port_of(mesh.url)),
        ("127.0.0.1", _port_of(mesh.service_address("secrets"))),
    ]
    code = f"""
import socket
print(socket.if_nameindex())
print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]))
for host, port in {targets!r}:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print("connected")
    except OSError as error:
        print(type(error).__name__)
"""
    try:
        body = ran(execute(client, user, code=code))
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever reached the test's listener
    finally:
        listener.close()
    interfaces, devices, *attempts = body["output"].splitlines()
    assert (interfaces, devices) == ("[(1, 'lo')]", "['lo']"), body
    assert "connected" not in attempts and len(attempts) == len(targets), body
    # Refused at once by the sandbox's own loopback, where nothing listens.
    assert [attempts[0], *attempts[2:]] == ["ConnectionRefusedError"] * 3, body
    assert_answers_normally(client, user)


# -- the file system -------------------------------------------------------------------------------


@on_one_mesh
def test_writing_outside_tmp_and_the_workdir_fails(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    data = mesh.layout.root
    targets = [
        "/etc/evil",
        "/usr/evil",
        "/usr/bin/evil",
        "/evil",
        "/proc/sys/kernel/hostname",
        "/dev/evil",
        str(data / "evil"),
        str(data / "keys" / "evil"),
        str(data / "db" / "evil"),
        "/work/evil",
        "/root/evil",
    ]
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
    body = ran(execute(client, user, code=code))
    outcome = json.loads(body["output"])
    assert set(outcome) == set(targets)
    assert "written" not in outcome.values(), outcome
    for target in targets:
        assert not (Path(target).exists() and target.endswith("/evil")), target
    # What it can write to: its working directory, /tmp and /dev/shm.
    allowed = (
        "for p in ('here', '/tmp/here', '/dev/shm/here'):\n    open(p, 'w').write('x')\nprint('written')"
    )
    assert ran(execute(client, user, code=allowed))["output"] == "written\n"
    assert_answers_normally(client, user)


@on_one_mesh
def test_a_file_written_in_one_run_is_gone_in_the_next(client: httpx.Client, user: dict) -> None:
    name = f"left-behind-{uuid.uuid4().hex}"
    places = f"('/tmp/{name}', '{name}', '/dev/shm/{name}')"
    first = ran(execute(client, user, code=f"for p in {places}:\n    open(p, 'w').write('x')\nprint('ok')"))
    assert first["output"] == "ok\n"
    look = (
        f"import os\nprint([os.path.exists(p) for p in {places}])\n"
        "print(os.listdir('/tmp'), sorted(os.listdir('.')), os.listdir('/dev/shm'))"
    )
    second = ran(execute(client, user, code=look))
    assert second["output"] == "[False, False, False]\n[] ['main.py'] []\n", second


@on_one_mesh
def test_the_mesh_data_directory_cannot_be_read(mesh: Mesh, client: httpx.Client, user: dict) -> None:
    data = mesh.layout.root
    paths = [
        data,
        data / "keys",
        mesh.layout.identity_key,
        mesh.layout.auth_secret_key,
        mesh.layout.access_token_key,
        mesh.openbao_files.init_file,
        mesh.openbao_files.service_token,
        mesh.layout.db / "auth.db",
        mesh.layout.db / "audit.db",
        mesh.layout.logs / "executor.log",
    ]
    for path in paths:
        assert path.exists(), path  # they are there, on the host
    code = f"""
import json, os
seen = {{}}
for path in {[str(p) for p in paths]!r}:
    try:
        if os.path.isdir(path):
            seen[path] = os.listdir(path)
        else:
            seen[path] = open(path, "rb").read().decode(errors="replace")
    except OSError as error:
        seen[path] = type(error).__name__
print(json.dumps(seen))
"""
    body = ran(execute(client, user, code=code))
    seen = json.loads(body["output"])
    assert seen == {str(p): "FileNotFoundError" for p in paths}, seen
    for path in (mesh.layout.identity_key, mesh.layout.auth_secret_key, mesh.openbao_files.service_token):
        secret = path.read_text().strip().splitlines()
        assert all(line not in body["output"] for line in secret if len(line) > 8)
    assert_answers_normally(client, user)


# -- the environment -------------------------------------------------------------------------------

LEAK_PROBE = """
import os, json
def read(path):
    try:
        return open(path, "rb").read().decode(errors="replace")
    except OSError as error:
        return type(error).__name__
print(json.dumps({"init": read("/proc/1/environ"), "self": read("/proc/self/environ"),
                  "cmdline": read("/proc/self/cmdline"), "environ": dict(os.environ)}))
"""


@pytest.fixture(scope="module")
def canary_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, dict[str, str]]]:
    """A mesh started with canary variables in this process's environment. OTEL_* variables are the
    ones the runner passes on to services, so that canary is in the executor's own environment."""
    canaries = {
        "PYTHONON_TEST_CANARY": f"canary-{uuid.uuid4().hex}",
        "OTEL_PYTHONON_TEST_CANARY": f"otel-canary-{uuid.uuid4().hex}",
        "TEST_CANARY_SECRET": f"plain-canary-{uuid.uuid4().hex}",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in canaries.items():
            patch.setenv(name, value)
        config = MeshConfig(port=0, data_dir=tmp_path_factory.mktemp("canary"), service_env=GENEROUS_LIMITS)
        with Mesh(config) as running:
            yield running, canaries


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def test_the_sandbox_sees_no_variable_of_the_host_or_the_service(canary_mesh: tuple[Mesh, dict]) -> None:
    mesh, canaries = canary_mesh
    executor_env = _environ_of(mesh.pids["executor"])
    # The premise: a canary did reach the executor's own environment, and so did its settings.
    assert executor_env.get("OTEL_PYTHONON_TEST_CANARY") == canaries["OTEL_PYTHONON_TEST_CANARY"]
    service_values = [v for k, v in executor_env.items() if k.startswith("PYTHONON_") and len(v) > 6]
    assert service_values  # addresses, the identity public key's path, ...

    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        user = register(client, "canary")
        body = ran(execute(client, user, code=LEAK_PROBE, env={"ONLY_THIS": "given"}))
        seen = json.loads(body["output"])
        assert set(seen["environ"]) == SAFE_ENV_NAMES | {"ONLY_THIS"}, seen["environ"]
        assert seen["environ"]["HOME"] == "/workspace"
        text = body["output"]
        for name, value in canaries.items():
            assert name not in text and value not in text, name
        assert "PYTHONON_" not in text
        for value in service_values:
            assert value not in text, value
        assert str(mesh.layout.root) not in text and executor_env["HOME"] not in text
        for name, value in os.environ.items():  # nothing of this test process's environment either
            if len(value) > 6 and value not in " ".join(seen["environ"].values()):
                assert value not in text, name
        assert_answers_normally(client, user)


# -- users -----------------------------------------------------------------------------------------


@on_one_mesh
def test_user_b_never_sees_user_as_secrets(client: httpx.Client) -> None:
    alice, bob = register(client, "alice"), register(client, "bob")
    name, value = f"ALICE_{uuid.uuid4().hex.upper()}", f"alices-{uuid.uuid4().hex}"
    stored = client.put(
        f"/api/v1/secrets/{name}", json={"value": value}, headers={"x-api-key": alice["apiKey"]}
    )
    assert stored.status_code == 200, stored.text
    probe = "import json, os\nprint(json.dumps(dict(os.environ)))"

    alices = ran(execute(client, alice, code=probe))
    assert json.loads(alices["output"])[name] == value  # it is injected, for her

    bobs = ran(execute(client, bob, code=probe))
    assert set(json.loads(bobs["output"])) == SAFE_ENV_NAMES
    assert name not in bobs["output"] and value not in bobs["output"]
    named = execute(client, bob, code=probe, secrets=[name])
    assert named.status_code == 400, named.text
    assert named.json() == {"code": 3, "message": f"secrets: no secret named {name}", "details": []}
    assert value not in named.text
    assert_answers_normally(client, bob)


# -- concurrency -----------------------------------------------------------------------------------


@on_one_mesh
def test_twenty_runs_in_parallel_each_get_their_own_output(mesh: Mesh, user: dict) -> None:
    tokens = [f"run-{i}-{uuid.uuid4().hex}" for i in range(20)]
    refusals: list[httpx.Response] = []

    def run(token: str) -> httpx.Response:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=mesh.url, timeout=30) as http:
            while True:
                response = execute(
                    http,
                    user,
                    code=f"import os\nprint(os.environ['TOKEN'], '{token}'[::-1])",
                    env={"TOKEN": token},
                )
                if response.status_code != 429 or time.monotonic() > deadline:
                    return response
                refusals.append(response)
                time.sleep(int(response.headers["retry-after"]))

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(run, tokens))
    for token, response in zip(tokens, responses, strict=True):
        body = ran(response)
        assert (body["output"], body["error"], body["exitCode"]) == (f"{token} {token[::-1]}\n", "", 0)
    assert len({r.json()["executionId"] for r in responses}) == 20
    for refused in refusals:  # saturation is answered honestly, never with someone else's output
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json() == {"code": 8, "message": "the executor is busy; retry shortly", "details": []}


@pytest.fixture(scope="module")
def saturated_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose executor runs one program at a time and lets none wait."""
    service_env = {
        **GENEROUS_LIMITS,
        "executor": {"PYTHONON_EXECUTOR_MAX_CONCURRENT": "1", "PYTHONON_EXECUTOR_MAX_QUEUE_SECONDS": "0"},
    }
    config = MeshConfig(port=0, data_dir=tmp_path_factory.mktemp("saturated"), service_env=service_env)
    with Mesh(config) as running:
        yield running


def test_a_saturated_executor_answers_429_with_retry_after(saturated_mesh: Mesh) -> None:
    mesh = saturated_mesh
    with httpx.Client(base_url=mesh.url, timeout=30) as client, ThreadPoolExecutor(max_workers=1) as pool:
        user = register(client, "saturated")
        assert ran(execute(client, user, code="print('warm')"))["output"] == "warm\n"

        def long_run() -> httpx.Response:
            with httpx.Client(base_url=mesh.url, timeout=30) as http:
                return execute(http, user, code="import time\ntime.sleep(5)\nprint('long')")

        in_flight = pool.submit(long_run)
        time.sleep(1.5)  # it holds the only slot by now
        refused = execute(client, user, code="print('refused')")
        assert not in_flight.done()  # refused while the long run was in flight, not after it
        assert refused.status_code == 429, refused.text
        assert refused.json() == {"code": 8, "message": "the executor is busy; retry shortly", "details": []}
        assert int(refused.headers["retry-after"]) >= 1

        with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
            with pytest.raises(grpc.RpcError) as exhausted:
                executor_pb2_grpc.ExecutorServiceStub(channel).Execute(
                    executor_pb2.ExecuteRequest(code="print('refused')"),
                    metadata=[("x-api-key", user["apiKey"])],
                    timeout=10,
                )
        assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exhausted.value.details() == "the executor is busy; retry shortly"
        assert int(dict(exhausted.value.initial_metadata())["retry-after"]) >= 1

        finished = ran(in_flight.result(timeout=30))
        assert (finished["output"], finished["exitCode"]) == ("long\n", 0)
        assert_answers_normally(client, user)


def test_the_executor_runs_its_sandboxes_from_trees_in_a_mount_namespace_of_its_own(
    mesh: Mesh, client: httpx.Client, user: dict
) -> None:
    """As root the executor re-execs itself under unshare (same pid, the runner's child) and its
    sandboxes take each runtime in two binds: their mount table is half what binding file by
    file gives (50 entries), and names no path of the mesh."""
    if os.geteuid() != 0:
        pytest.skip("trees are built as root")
    executor = mesh.pids["executor"]
    assert os.readlink(f"/proc/{executor}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    code = "t = open('/proc/self/mountinfo').read()\nprint(t.count(chr(10)), 'pythonon-' in t, '/tmp/' in t)"
    response = client.post("/api/v1/execute", json={"code": code}, headers={"x-api-key": user["apiKey"]})
    assert response.status_code == 200, response.text
    lines, *leaks = response.json()["output"].split()
    assert int(lines) < 35 and leaks == ["False", "False"], response.json()
