"""The gvisor sandbox backend behind the whole mesh, as `pyth-on up --sandbox gvisor` runs it (the
runner's umask, its environment, the edge): skipped with the reason where runsc is not installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from services.runner.mesh import Mesh, MeshConfig
from tests.integration.conftest import PASSWORD, error_message, new_email

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="gVisor's runsc is not installed")


def test_runs_go_through_gvisor_with_the_users_secrets(tmp_path: Path) -> None:
    # The operator leaves javascript out (a backend option, validated at start-up), so that a
    # language this host has is refused as one it lacks would be.
    executor = {
        "PYTHONON_EXECUTOR_BACKEND": "gvisor",
        "PYTHONON_EXECUTOR_BACKEND_OPTIONS": json.dumps({"languages": ["python", "bash"]}),
    }
    config = MeshConfig(port=0, data_dir=tmp_path, service_env={"executor": executor})
    with Mesh(config) as mesh, httpx.Client(base_url=mesh.url, timeout=60) as client:
        info = client.get("/api/info").json()
        assert info["sandbox"] == "gvisor" and sorted(info["languages"]) == ["bash", "python"]
        user = client.post("/api/register", json={"email": new_email("gvisor"), "password": PASSWORD}).json()
        headers = {"x-api-key": user["apiKey"]}
        refused = client.post(
            "/api/v1/execute", json={"code": "console.log(1)", "language": "javascript"}, headers=headers
        )
        assert error_message(refused, 400, 3) == (
            "javascript is not available on this server; available: " + ", ".join(info["languages"])
        )
        assert (
            client.put("/api/v1/secrets/GV_TOKEN", json={"value": "gv-value"}, headers=headers).status_code
            == 200
        )
        code = "import os, socket\nprint(os.uname().release, os.environ['GV_TOKEN'], os.getuid() != 0)\n"
        code += "print(sorted(name for _, name in socket.if_nameindex()))"
        response = client.post("/api/v1/execute", json={"code": code}, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        release = body["output"].splitlines()[0].split()[0]
        # gVisor's own kernel answers uname, not the host's.
        assert release != Path("/proc/sys/kernel/osrelease").read_text().strip()
        assert body["output"].splitlines()[0].split()[1:] == ["gv-value", "True"]
        assert (body["exitCode"], body["timedOut"]) == (0, False)
        spin = client.post(
            "/api/v1/execute", json={"code": "while True: pass", "timeout": 1}, headers=headers
        )
        assert spin.status_code == 200 and spin.json()["timedOut"] is True and spin.json()["exitCode"] == 137
