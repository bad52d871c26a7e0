"""The runner: the data directory and its keys, ports, and the supervision of a real mesh (the
services and Envoy as processes, exactly as `pyth-on up` starts them)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from services.platform import service_graph
from services.platform.identity import Identity, IdentitySigner, IdentityVerifier, public_key_pem
from services.runner.cli import main
from services.runner.layout import MESH_IDENTITIES, DataLayout
from services.runner.mesh import SERVICES, Mesh, MeshConfig, MeshError, MeshPlan, MeshPorts, Restart

BUILT = [spec.name for spec in SERVICES]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield listener.getsockname()[1]


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone in every way that matters, but only its parent can reap it.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if process_exists(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


# -- The data directory ---------------------------------------------------------------------------


def test_first_start_creates_private_keys_and_later_starts_keep_them(tmp_path: Path) -> None:
    layout = DataLayout.at(tmp_path / "data")
    created = layout.prepare()
    issued_before = layout.mesh_key("auth").read_bytes()

    keys = [layout.identity_key, layout.identity_public_key, layout.access_token_key, layout.auth_secret_key]
    mesh_files = [layout.mesh_ca_key, layout.mesh_ca_certificate] + [
        path for name in MESH_IDENTITIES for path in (layout.mesh_key(name), layout.mesh_certificate(name))
    ]
    assert sorted(created) == sorted(keys + mesh_files)
    for key in mesh_files:
        assert mode(key) == 0o600, key
    for directory in (layout.root, layout.keys, layout.mesh_keys, layout.db, layout.logs):
        assert mode(directory) == 0o700, directory
    for key in keys:
        assert mode(key) == 0o600, key
    assert layout.identity_public_key.read_bytes() == public_key_pem(layout.identity_key.read_bytes())
    assert len(base64.b64decode(layout.auth_secret_key.read_bytes().strip(), validate=True)) == 32
    assert layout.identity_key.read_bytes() != layout.access_token_key.read_bytes()
    # The identity pair works as a pair.
    token = IdentitySigner(layout.identity_key.read_bytes()).sign(Identity("u", "e"))
    assert IdentityVerifier(layout.identity_public_key.read_bytes()).verify(token).user_id == "u"

    before = {key: key.read_bytes() for key in keys + [layout.mesh_ca_key, layout.mesh_ca_certificate]}
    assert layout.prepare() == []
    # The keys and the mesh CA are kept; every member's certificate is issued afresh (rotated).
    assert {key: key.read_bytes() for key in before} == before
    assert layout.mesh_key("auth").read_bytes() != issued_before


def test_loosened_modes_are_tightened_and_a_lost_public_key_is_derived_again(tmp_path: Path) -> None:
    layout = DataLayout.at(tmp_path / "data")
    layout.prepare()
    layout.root.chmod(0o755)
    layout.auth_secret_key.chmod(0o644)
    original_public = layout.identity_public_key.read_bytes()
    layout.identity_public_key.unlink()

    assert layout.prepare() == [layout.identity_public_key]
    assert mode(layout.root) == 0o700
    assert mode(layout.auth_secret_key) == 0o600
    assert layout.identity_public_key.read_bytes() == original_public
    assert mode(layout.identity_public_key) == 0o600


def test_a_new_data_directory_is_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        DataLayout.at(tmp_path / "a" / "b").prepare()
    finally:
        os.umask(previous)
    assert mode(tmp_path / "a" / "b") == 0o700
    assert mode(tmp_path / "a" / "b" / "keys" / "identity.key") == 0o600


# -- Ports ----------------------------------------------------------------------------------------


def test_port_zero_picks_distinct_free_ports_for_everything(tmp_path: Path) -> None:
    ports = MeshConfig(port=0, data_dir=tmp_path).pick_ports()
    every = [ports.edge, *ports.services.values()]
    assert sorted(ports.services) == sorted(BUILT)
    assert all(port > 0 for port in every)
    assert len(set(every)) == len(every)
    for port in every:  # free right after being picked
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_a_given_free_port_is_kept(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert MeshConfig(port=free, data_dir=tmp_path).pick_ports().edge == free


def test_a_taken_port_is_refused_clearly(tmp_path: Path, taken_port: int) -> None:
    with pytest.raises(MeshError, match=rf"port {taken_port} on 127\.0\.0\.1 is already in use.*--port"):
        MeshConfig(port=taken_port, data_dir=tmp_path).pick_ports()


def test_pyth_on_up_on_a_taken_port_exits_with_a_clear_message_and_starts_nothing(
    tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--port", str(taken_port), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert f"port {taken_port} on 127.0.0.1 is already in use" in err
    assert not any((tmp_path / "data" / "logs").iterdir())  # no process was started


def test_bad_arguments_are_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["up", "--port", "70000", "--data-dir", str(tmp_path)]) == 2
    assert "--port must be 0-65535" in capsys.readouterr().err
    assert main(["up", "--database-url", "mysql://root:hunter2@db/x", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--database-url must be a sqlite:// or postgresql:// URL" in err
    assert "hunter2" not in err
    with pytest.raises(MeshError, match="not built"):
        MeshConfig(service_env={"nosuch": {}})


def test_a_data_directory_in_use_is_refused(tmp_path: Path) -> None:
    DataLayout.at(tmp_path).prepare()
    with open(tmp_path / "mesh.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(MeshError, match=r"in use by another pyth-on \(pid 4242\)"):
            Mesh(MeshConfig(port=0, data_dir=tmp_path)).start()


# -- Wiring, from the service graph ---------------------------------------------------------------


def _plan_for_every_service(mesh: Mesh) -> MeshPlan:
    """A plan with a port for every service of the graph, built or not (nothing is started)."""
    ports = {name: 5000 + index for index, name in enumerate(service_graph.SECTIONS)}
    return MeshPlan(
        layout=mesh.layout,
        ports=MeshPorts(edge=8080, services=ports, vault=8200),
        database_urls={
            node.name: f"sqlite:///{node.name}.db" for node in service_graph.SERVICES if node.database
        },
    )


def _addresses(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.endswith("_ADDRESS")}


def test_the_packages_service_gets_the_operators_proxy_and_trust_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uv behind a TLS-intercepting proxy needs the operator's CA file or directory and proxy."""
    given = {
        "SSL_CERT_FILE": "/etc/corporate/ca.pem",
        "SSL_CERT_DIR": "/etc/corporate/certs",
        "UV_NATIVE_TLS": "true",
        "HTTPS_PROXY": "http://proxy.internal:3128",
    }
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    mesh = Mesh(MeshConfig(port=0, data_dir=tmp_path))
    plan = _plan_for_every_service(mesh)
    env = {node.name: mesh._service_env(node, plan) for node in service_graph.SERVICES}
    assert {name: env["packages"].get(name) for name in given} == given
    # Only the service that reaches the index gets them.
    assert all(
        "HTTPS_PROXY" not in env[name] and "SSL_CERT_FILE" not in env[name]
        for name in env
        if name != "packages"
    )


def test_each_service_gets_the_addresses_of_what_it_calls_and_its_outside_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-outside")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("PYTHONON_RUNNER_CANARY", "must-not-leak")
    mesh = Mesh(MeshConfig(port=0, data_dir=tmp_path))
    plan = _plan_for_every_service(mesh)
    env = {node.name: mesh._service_env(node, plan) for node in service_graph.SERVICES}

    assert _addresses(env["generator"]) == {
        "PYTHONON_EXECUTOR_ADDRESS": "127.0.0.1:5001",
        "PYTHONON_SECRETS_ADDRESS": "127.0.0.1:5002",
        "PYTHONON_PACKAGES_ADDRESS": "127.0.0.1:5005",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:5003",
    }
    assert env["generator"]["ANTHROPIC_API_KEY"] == "sk-outside"
    assert "ANTHROPIC_BASE_URL" not in env["generator"]  # not set here: not invented
    assert all("ANTHROPIC_API_KEY" not in env[name] for name in env if name != "generator")
    assert all("PYTHONON_RUNNER_CANARY" not in variables for variables in env.values())

    assert _addresses(env["executor"]) == {
        "PYTHONON_SECRETS_ADDRESS": "127.0.0.1:5002",
        "PYTHONON_PACKAGES_ADDRESS": "127.0.0.1:5005",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:5003",
    }
    assert _addresses(env["audit"]) == {}
    assert env["auth"]["PYTHONON_AUTH_DATABASE_URL"] == "sqlite:///auth.db"
    assert "PYTHONON_SECRETS_DATABASE_URL" not in env["secrets"]
    assert env["secrets"]["PYTHONON_SECRETS_VAULT_ADDR"] == "http://127.0.0.1:8200"
    assert _addresses(env["system"]) == {
        "PYTHONON_AUTH_ADDRESS": "127.0.0.1:5000",
        "PYTHONON_EXECUTOR_ADDRESS": "127.0.0.1:5001",
        "PYTHONON_SECRETS_ADDRESS": "127.0.0.1:5002",
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:5003",
        "PYTHONON_GENERATOR_ADDRESS": "127.0.0.1:5004",
        "PYTHONON_PACKAGES_ADDRESS": "127.0.0.1:5005",
        "PYTHONON_ZK_ADDRESS": "127.0.0.1:5006",
    }
    assert env["system"]["PYTHONON_SYSTEM_DATABASE_URLS"] == (
        "sqlite:///auth.db,sqlite:///audit.db,sqlite:///packages.db,sqlite:///zk.db"
    )


# -- A real mesh ----------------------------------------------------------------------------------


def test_a_mesh_starts_serves_and_stops_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONON_RUNNER_CANARY", "must-not-leak")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "passed-through")
    config = MeshConfig(
        port=0, data_dir=tmp_path / "data", service_env={"auth": {"PYTHONON_AUTH_USER_RATE_BURST": "7"}}
    )
    with Mesh(config) as mesh:
        pids = mesh.pids
        assert sorted(pids) == sorted([*BUILT, "envoy", "openbao"])
        health = httpx.get(f"{mesh.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        # No ANTHROPIC_API_KEY here: the generator runs, and says it is not configured.
        assert {name: health.json()["services"][name] for name in BUILT} == {
            **dict.fromkeys(BUILT, "ok"),
            "generator": "not_configured",
        }
        assert health.json()["services"]["database"] == "ok"

        environments = {name: _environ(pid) for name, pid in pids.items()}
        for name, env in environments.items():
            assert "PYTHONON_RUNNER_CANARY" not in env, name
            assert env["HOME"] == str(mesh.layout.root)
            assert env["OTEL_SERVICE_NAME"] == "passed-through"
        auth, system = environments["auth"], environments["system"]
        assert auth["PYTHONON_PORT"] == str(mesh.ports.services["auth"])
        assert auth["PYTHONON_IDENTITY_PUBLIC_KEY_FILE"] == str(mesh.identity_public_key_path)
        assert auth["PYTHONON_AUTH_IDENTITY_KEY_FILE"] == str(mesh.identity_key_path)
        assert auth["PYTHONON_AUTH_DATABASE_URL"] == f"sqlite:///{mesh.layout.db / 'auth.db'}"
        assert auth["PYTHONON_AUTH_USER_RATE_BURST"] == "7"
        assert {name: system[f"PYTHONON_{name.upper()}_ADDRESS"] for name in BUILT if name != "system"} == {
            name: mesh.service_address(name) for name in BUILT if name != "system"
        }
        assert system["PYTHONON_SYSTEM_DATABASE_URLS"].split(",") == [
            f"sqlite:///{mesh.layout.db / f'{service.name}.db'}" for service in SERVICES if service.database
        ]
        for name, env in environments.items():
            wired = {variable: env[variable] for variable in env if variable.endswith("_ADDRESS")}
            expected = service_graph.calls(name) if name in BUILT else ()
            assert wired == {
                service_graph.address_variable(callee): mesh.service_address(callee) for callee in expected
            }, name
        # The edge's upstreams: every built section, by address.
        clusters = json.loads(mesh.layout.envoy_config.read_text())["static_resources"]["clusters"]
        upstreams = {
            cluster["name"].removeprefix("pythonon_"): "{address}:{port_value}".format(
                **cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                    "socket_address"
                ]
            )
            for cluster in clusters
        }
        assert upstreams == {name: mesh.service_address(name) for name in BUILT}
        assert mode(mesh.layout.db / "auth.db") == 0o600
        assert mesh.exited() is None

    assert wait_gone(list(pids.values())) == []
    assert (tmp_path / "data" / "db" / "auth.db").exists()  # state is kept
    assert (tmp_path / "data" / "mesh.lock").exists()


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend(
                    ExportedSpan(
                        attributes.get("service.name", ""),
                        span.name,
                        span.kind,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                    )
                    for span in scope.spans
                )
        return trace_service_pb2.ExportTraceServiceResponse()


SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


def test_a_trace_runs_from_the_edge_through_the_executor_to_secrets_and_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        with (
            Mesh(MeshConfig(port=0, data_dir=tmp_path / "data")) as mesh,
            httpx.Client(base_url=mesh.url, timeout=30) as client,
        ):
            user = client.post(
                "/api/register",
                json={"email": "trace@example.com", "password": "correct horse battery staple"},
            ).json()
            headers = {"x-api-key": user["apiKey"]}
            assert (
                client.put("/api/v1/secrets/TOKEN", json={"value": "v"}, headers=headers).status_code == 200
            )
            ran = client.post(
                "/api/v1/execute",
                json={"code": "print(1)", "secrets": ["TOKEN"]},
                headers={**headers, "traceparent": f"00-{trace_id}-{caller_span}-01"},
            )
            assert ran.status_code == 200, ran.text

            def traced() -> dict[tuple[str, int, str], ExportedSpan]:
                return {(s.service, s.kind, s.name): s for s in collector.spans if s.trace_id == trace_id}

            execute = "/pythonon.executor.v1.ExecutorService/Execute"
            resolve = "/pythonon.secrets.v1.SecretsResolverService/ResolveSecrets"
            record = "/pythonon.audit.v1.AuditRecorderService/Record"
            wanted = {
                ("pythonon-executor", SERVER, execute),
                ("pythonon-executor", CLIENT, resolve),
                ("pythonon-secrets", SERVER, resolve),
                ("pythonon-executor", CLIENT, record),
                ("pythonon-audit", SERVER, record),
            }
            deadline = time.monotonic() + 15
            while not wanted <= set(traced()) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        server.stop(None)
    spans = traced()
    assert wanted <= set(spans), sorted(spans)
    # The caller's context crossed the edge; each internal call is a child of the span that made it.
    assert spans[("pythonon-executor", SERVER, execute)].parent_span_id == caller_span
    executor_span = spans[("pythonon-executor", SERVER, execute)].span_id
    for callee, method in (("pythonon-secrets", resolve), ("pythonon-audit", record)):
        client_span = spans[("pythonon-executor", CLIENT, method)]
        assert client_span.parent_span_id == executor_span, method
        assert spans[(callee, SERVER, method)].parent_span_id == client_span.span_id, method


def test_without_restarts_a_service_that_dies_is_named(tmp_path: Path) -> None:
    with Mesh(MeshConfig(port=0, data_dir=tmp_path / "data", restart_limit=0)) as mesh:
        os.kill(mesh.pids["system"], signal.SIGKILL)
        ended = mesh.wait(timeout=10)
        assert ended is not None
        name, description = ended
        assert name == "system"
        assert description.startswith("system was killed by signal 9; last lines of ")
        assert '"msg": "serving"' in description
        assert mesh.restarts == []
        pids = list(mesh.pids.values())
    assert wait_gone(pids) == []


def _wait_new_pid(mesh: Mesh, name: str, old: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while (pid := mesh.pids[name]) == old:
        assert time.monotonic() < deadline, f"{name} was not restarted"
        time.sleep(0.05)
    return pid


def test_a_service_that_dies_is_restarted_with_the_same_environment_and_port_until_the_bound(
    tmp_path: Path,
) -> None:
    reported: list[Restart] = []
    config = MeshConfig(port=0, data_dir=tmp_path / "data", restart_limit=2, restart_delay_seconds=0.1)
    with Mesh(config, on_restart=reported.append) as mesh:
        first = mesh.pids["audit"]
        environment = _environ(first)
        os.kill(first, signal.SIGKILL)
        second = _wait_new_pid(mesh, "audit", first)
        assert _environ(second) == environment  # the port among it
        assert reported == [Restart("audit", "was killed by signal 9", 1, 2, 0.1)]
        deadline = time.monotonic() + 10
        while httpx.get(f"{mesh.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "audit did not come back"
            time.sleep(0.1)
        assert "(restart 1: it was killed by signal 9) ---" in mesh.log_path("audit").read_text()

        os.kill(second, signal.SIGTERM)
        third = _wait_new_pid(mesh, "audit", second)
        assert reported[-1] == Restart("audit", "exited with status 0", 2, 2, 0.2)  # back-off doubled
        assert mesh.exited() is None

        os.kill(third, signal.SIGKILL)  # the third end within the window: final
        ended = mesh.wait(timeout=10)
        assert ended is not None
        name, description = ended
        assert name == "audit"
        assert description.startswith(
            "audit was killed by signal 9 (it ended 3 times within 60 s; not restarted again); last lines of "
        )
        assert len(reported) == 2
        pids = list(mesh.pids.values())
    assert wait_gone(pids) == []


def test_a_killed_openbao_is_unsealed_again_and_secrets_are_kept(tmp_path: Path) -> None:
    with Mesh(MeshConfig(port=0, data_dir=tmp_path / "data")) as mesh:
        client = httpx.Client(base_url=mesh.url, timeout=30)
        user = client.post(
            "/api/register", json={"email": "bao@example.com", "password": "correct horse battery staple"}
        ).json()
        headers = {"x-api-key": user["apiKey"]}
        assert client.put("/api/v1/secrets/KEPT", json={"value": "v1"}, headers=headers).status_code == 200
        token = mesh.openbao_files.service_token.read_text()

        old = mesh.pids["openbao"]
        os.kill(old, signal.SIGKILL)
        _wait_new_pid(mesh, "openbao", old)
        deadline = time.monotonic() + 15
        while (listed := client.get("/api/v1/secrets", headers=headers)).status_code != 200:
            assert time.monotonic() < deadline, listed.text
            time.sleep(0.1)
        assert [secret["name"] for secret in listed.json()["secrets"]] == ["KEPT"]
        assert client.get("/health").json()["services"]["vault"] == "ok"
        # The secrets service carries on with the token it had: none was issued or revoked.
        assert mesh.openbao_files.service_token.read_text() == token
        client.close()


def _start_pyth_on_up(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """`pyth-on up` on a free port, as a user runs it; returns once it says it is up, with its URL."""
    runner = subprocess.Popen(
        [sys.executable, "-m", "services.runner.cli", "up", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert runner.stdout is not None
    for line in runner.stdout:
        if line.startswith("Pyth-On is up at "):
            return runner, line.removeprefix("Pyth-On is up at ").strip()
    pytest.fail(f"the runner ended without coming up (status {runner.wait()})")


def test_pyth_on_up_prints_the_url_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    runner, url = _start_pyth_on_up(tmp_path / "d")
    try:
        assert httpx.get(f"{url}/api/info", timeout=10).json()["name"] == "Pyth-On"
        children = _children_of(runner.pid)
        assert len(children) == len(BUILT) + 2  # and Envoy and OpenBao

        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=30) == 0
        assert runner.stdout is not None and "Stopped." in runner.stdout.read()
        assert wait_gone(children) == []
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_pyth_on_up_prints_each_restart_and_stops_everything_when_a_part_keeps_failing(
    tmp_path: Path,
) -> None:
    runner, url = _start_pyth_on_up(tmp_path / "d")
    try:
        children = _children_of(runner.pid)
        envoy = next(pid for pid in children if "envoy" in Path(f"/proc/{pid}/cmdline").read_text())
        os.kill(envoy, signal.SIGKILL)
        assert runner.stdout is not None
        assert runner.stdout.readline().startswith("Logs are in ")
        assert runner.stdout.readline() == (
            "pyth-on: envoy was killed by signal 9; restarting it in 0.2 s (attempt 1 of 5)\n"
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "envoy did not come back"
            time.sleep(0.1)

        # A configuration Envoy refuses: every restart fails at once, until the bound.
        (tmp_path / "d" / "envoy.json").write_text("{not json")
        envoy = next(
            pid for pid in _children_of(runner.pid) if "envoy" in Path(f"/proc/{pid}/cmdline").read_text()
        )
        os.kill(envoy, signal.SIGKILL)
        assert runner.wait(timeout=60) == 1
        output = runner.stdout.read()
        for attempt, delay in ((2, "0.4"), (3, "0.8"), (4, "1.6"), (5, "3.2")):
            assert f"restarting it in {delay} s (attempt {attempt} of 5)\n" in output
        assert (
            "pyth-on: envoy exited with status 1 (it ended 6 times within 60 s; not restarted again)"
            in output
        )
        assert output.endswith("Stopping the whole mesh.\nStopped.\n")
        assert wait_gone(children) == []
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


def _children_of(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{pid}\n" in status.read_text():
                found.append(int(status.parent.name))
        except OSError:
            continue
    return found


def test_a_killed_runner_leaves_no_process_behind(tmp_path: Path) -> None:
    runner, _url = _start_pyth_on_up(tmp_path / "d")
    try:
        children = _children_of(runner.pid)
        assert len(children) == len(BUILT) + 2
    finally:
        runner.kill()  # SIGKILL: the runner gets no chance to stop anything itself
        runner.wait()
    assert wait_gone(children) == []
