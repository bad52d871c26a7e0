"""The kubernetes sandbox backend behind the whole mesh: the executor (a process of the mesh, as
`pyth-on up` runs it) drives the mock API server of a local cluster (tests/sandbox/local_cluster.py),
whose stand-in kubelet starts each pod's runner in bubblewrap, so every run below is pulled by a
pod with its one-time token and reported back. Through Envoy, as curl would: a user's package
environment, built by the packages service from a local index, reaches the pod read-only from the
packages volume (another user's is not visible), and an encrypted run is decrypted inside the pod;
nothing of the code, the password or the environment's files is in any request to the API server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.executor.sandbox import kubernetes
from services.platform.package_store import SANDBOX_MOUNT
from services.runner.mesh import Mesh, MeshConfig
from services.zk import recipe
from tests.integration.conftest import GENEROUS_LIMITS, PASSWORD, new_email
from tests.packages.local_index import standard_index
from tests.sandbox.local_cluster import PACKAGES_CLAIM, LocalCluster, local_cluster

ZK_PASSWORD = "k8s zk pass phrase"
ZK_KDF = recipe.KdfParams(memory_kib=8 * 1024, iterations=1, parallelism=1)


@pytest.fixture(scope="module")
def cluster_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, LocalCluster, Path]]:
    data_dir = tmp_path_factory.mktemp("kubernetes-mesh")
    store = data_dir / "packages"
    store.mkdir()
    index = standard_index(tmp_path_factory.mktemp("index"))
    with index.serve(), local_cluster(volumes={PACKAGES_CLAIM: os.path.realpath(store)}) as cluster:
        options = cluster.options(smoke_test=False, pool_size=1, packages_dir=str(store))
        service_env = {
            **GENEROUS_LIMITS,
            "executor": {
                **GENEROUS_LIMITS.get("executor", {}),
                "PYTHONON_EXECUTOR_BACKEND": "kubernetes",
                "PYTHONON_EXECUTOR_BACKEND_OPTIONS": json.dumps(options),
            },
            "packages": {"PYTHONON_PACKAGES_INDEX_URL": index.url},
        }
        with Mesh(MeshConfig(port=0, data_dir=data_dir, service_env=service_env)) as mesh:
            yield mesh, cluster, store


@pytest.fixture()
def http(cluster_mesh: tuple[Mesh, LocalCluster, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster_mesh[0].url, timeout=60) as client:
        yield client


def _user(http: httpx.Client) -> dict[str, str]:
    response = http.post("/api/register", json={"email": new_email("k8s"), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return {"x-api-key": response.json()["apiKey"]}


def _ready(http: httpx.Client, key: dict[str, str], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        packages = http.get("/api/v1/packages", headers=key).json()["packages"]
        if all(package["status"] == "ready" for package in packages):
            return
        assert all(p["status"] != "failed" for p in packages) and time.monotonic() < deadline, packages
        time.sleep(0.2)


def _pod_specs_since(cluster: LocalCluster, count: int) -> list[dict]:
    return [request.body["spec"]["template"]["spec"] for request in cluster.api.made("POST", "jobs")[count:]]


def test_a_users_package_environment_reaches_the_pod_read_only_and_only_theirs(
    http: httpx.Client, cluster_mesh: tuple[Mesh, LocalCluster, Path]
) -> None:
    _, cluster, store = cluster_mesh
    alice, bob = _user(http), _user(http)
    assert http.put("/api/v1/packages", json={"packages": ["tiny-greet"]}, headers=alice).status_code == 200
    _ready(http, alice)
    jobs_before = len(cluster.api.made("POST", "jobs"))
    probe = (
        "import os, tiny_greet\n"
        "print(tiny_greet.hello(), tiny_greet.__file__)\n"
        "try:\n    open(os.path.join(os.path.dirname(tiny_greet.__file__), 'evil.py'), 'w')\n"
        "except OSError as error:\n    print(error.errno)\n"
        f"print(sorted(os.listdir('{SANDBOX_MOUNT}')))\n"
    )
    ran = http.post("/api/v1/execute", json={"code": probe}, headers=alice)
    assert ran.status_code == 200, ran.text
    lines = ran.json()["output"].splitlines()
    assert lines[0] == f"hello from tiny-greet dep 1.0 {SANDBOX_MOUNT}/tiny_greet/__init__.py", ran.json()
    assert lines[1] == "30"  # EROFS
    # The environment's own files only: no other environment, no lock, no marker of the store.
    assert "lock.txt" not in lines[2] and "tiny_greet" in lines[2]
    (environment,) = (store / "environments").iterdir()
    (instance,) = [entry for entry in environment.iterdir() if entry.is_dir()]
    assert not (instance / "tiny_greet" / "evil.py").exists()
    # The pod that ran it: the store's claim, read-only, at that environment's subPath.
    specs = _pod_specs_since(cluster, jobs_before)
    mounted = [
        (volume, mount)
        for spec in specs
        for volume in spec["volumes"]
        for mount in spec["containers"][0]["volumeMounts"]
        if "persistentVolumeClaim" in volume and mount["name"] == volume["name"]
    ]
    assert mounted and all(
        volume["persistentVolumeClaim"] == {"claimName": PACKAGES_CLAIM, "readOnly": True}
        and mount
        == {
            "name": kubernetes.PACKAGES_VOLUME,
            "mountPath": SANDBOX_MOUNT,
            "subPath": f"environments/{environment.name}/{instance.name}",
            "readOnly": True,
        }
        for volume, mount in mounted
    ), mounted
    # Bob has no packages: his run's pod mounts nothing of the store, and sees nothing of Alice's.
    jobs_before = len(cluster.api.made("POST", "jobs"))
    absent = http.post(
        "/api/v1/execute",
        json={
            "code": f"import os, importlib.util\nprint(importlib.util.find_spec('tiny_greet'), os.path.exists('{SANDBOX_MOUNT}'))"
        },
        headers=bob,
    )
    assert absent.json()["output"] == "None False\n", absent.text
    for spec in _pod_specs_since(cluster, jobs_before):
        assert all("persistentVolumeClaim" not in volume for volume in spec["volumes"])


def test_an_encrypted_run_is_decrypted_inside_the_pod(
    http: httpx.Client, cluster_mesh: tuple[Mesh, LocalCluster, Path]
) -> None:
    _, cluster, _ = cluster_mesh
    key = _user(http)
    deleted_before = len(cluster.api.made("DELETE", "jobs"))
    code = "import sys\nprint('clear text of the k8s zk run', sys.stdin.read())"
    payload = recipe.encrypt(code, ZK_PASSWORD, ZK_KDF).to_json()
    stored = http.put("/api/v1/zk/code/sealed", json={"payload": payload, "language": "python"}, headers=key)
    assert stored.status_code == 200, stored.text
    ran = http.post("/api/v1/zk/execute/sealed", json={"password": ZK_PASSWORD, "stdin": "in"}, headers=key)
    assert ran.status_code == 200, ran.text
    assert (ran.json()["output"], ran.json()["exitCode"]) == ("clear text of the k8s zk run in\n", 0)
    # A pod ran it: each run's Job is deleted once its answer is known.
    deadline = time.monotonic() + 30
    while len(cluster.api.made("DELETE", "jobs")) == deleted_before:
        assert time.monotonic() < deadline, "no sandbox pod ran the encrypted code"
        time.sleep(0.1)
    wrong = http.post("/api/v1/zk/execute/sealed", json={"password": "not it"}, headers=key)
    assert wrong.status_code == 403, wrong.text
    # Neither the password nor the code, in clear or sealed, was ever in a request to the API server.
    sent = json.dumps([[r.path, r.query, r.body] for r in cluster.api.requests])
    for secret in (ZK_PASSWORD, "clear text of the k8s zk run", payload["ciphertext"]):
        assert secret not in sent
