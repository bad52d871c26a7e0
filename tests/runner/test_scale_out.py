"""`pyth-on up --executors N`: several executor processes behind the edge, each with its own port,
sandboxes and share of the host; the edge (and any service that calls the executor) balances runs
over them, and the runner supervises each."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from edge import config as edge_config
from services.platform import client, service_graph
from services.runner.mesh import Mesh, MeshConfig, MeshError

PASSWORD = "correct horse battery staple"


def test_two_executors_share_the_runs_and_a_killed_one_comes_back(tmp_path: Path) -> None:
    with Mesh(MeshConfig(port=0, data_dir=tmp_path, executors=2, restart_delay_seconds=0.1)) as mesh:
        assert {"executor", "executor-2"} <= set(mesh.pids)
        assert mesh.pids["executor"] != mesh.pids["executor-2"]
        with httpx.Client(base_url=mesh.url, timeout=30) as http:
            key = http.post(
                "/api/register",
                json={"email": f"scale-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD},
            ).json()["apiKey"]
            headers = {"x-api-key": key}
            for number in range(12):
                answer = http.post("/api/v1/execute", json={"code": f"print({number})"}, headers=headers)
                assert (answer.status_code, answer.json()["output"]) == (200, f"{number}\n")
            # Round-robin at the edge: each executor served some of them.
            for name in ("executor", "executor-2"):
                served = (
                    mesh.log_path(name)
                    .read_text()
                    .count('"method": "/pythonon.executor.v1.ExecutorService/Execute"')
                )
                assert served >= 3, (name, served)
            # Each sized itself for half of the host.
            for name in ("executor", "executor-2"):
                assert "PYTHONON_EXECUTOR_REPLICAS_ON_HOST" in (
                    Path(f"/proc/{mesh.pids[name]}/environ").read_bytes().decode(errors="replace")
                )
            killed = mesh.pids["executor-2"]
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while mesh.pids.get("executor-2") in (killed, None):
                assert time.monotonic() < deadline, "executor-2 was not restarted"
                time.sleep(0.05)
            assert any(restart.part == "executor-2" for restart in mesh.restarts)
            # While it restarts, runs go to the other one (Envoy retries a request that never
            # reached a replica; one that did is never retried).
            answers = [
                http.post("/api/v1/execute", json={"code": "print('again')"}, headers=headers)
                for _ in range(6)
            ]
            assert [(a.status_code, a.json().get("output")) for a in answers] == [(200, "again\n")] * 6


def test_executors_out_of_range_are_refused(tmp_path: Path) -> None:
    for wrong in (0, 17):
        with pytest.raises(MeshError, match="--executors must be 1-16"):
            MeshConfig(port=0, data_dir=tmp_path, executors=wrong)


def test_replica_addresses_become_one_balanced_target_and_several_endpoints() -> None:
    assert service_graph.split_addresses("127.0.0.1:1,127.0.0.1:2") == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    with pytest.raises(ValueError, match="IP addresses of one family"):
        service_graph.split_addresses("executor:1,127.0.0.1:2")
    assert client.channel_target("127.0.0.1:5") == ("127.0.0.1:5", ())
    assert client.channel_target("127.0.0.1:5,127.0.0.1:6") == (
        "ipv4:127.0.0.1:5,127.0.0.1:6",
        (("grpc.lb_policy_name", "round_robin"),),
    )
    rendered = edge_config.render(
        listen_port=8080,
        upstreams={"auth": "127.0.0.1:1", "system": "127.0.0.1:2", "executor": "127.0.0.1:3,127.0.0.1:4"},
    )
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == "pythonon_executor"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [3, 4]
    assert cluster["type"] == "STATIC"
