"""The kubernetes backend without a cluster: the official client against the mock API server
(mock_kubernetes.py, every request recorded) and pods whose runner is started locally in
bubblewrap (local_cluster.py), or played by the test where a pod must misbehave.

What is checked: the exact Job the backend creates and that nothing of a run is in it; the
one-time tokens (a replayed, foreign or misplaced token is refused, and the pod it belonged to is
deleted); the warm pool; timeouts (the pod deleted), OOM kills, evictions and pods never scheduled
ending the run clearly; the watch resuming; orphans reaped at start; 403s named; a clean close."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor import encrypted_runs
from services.executor.sandbox import (
    BackendOptionError,
    Limits,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
    backend_options,
    create_backend,
    kubernetes,
)
from services.executor.sandbox.pod_runner import CLAIM_TOKEN_VARIABLE
from services.platform.package_store import SANDBOX_MOUNT
from services.zk import recipe
from tests.sandbox.conftest import started_backend
from tests.sandbox.local_cluster import NAMESPACE, LocalCluster, local_cluster
from tests.sandbox.mock_kubernetes import Object

SECRET_CODE = "print('the code of s3cret-code')"
SECRET_STDIN = "s3cret-stdin"
SECRET_ENV = "s3cret-env-value"
SECRET_PASSWORD = b"s3cret-password"
FAST = {"smoke_test": False, "languages": ["python"]}


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as started:
        yield started


def backend(cluster: LocalCluster, **options: Any) -> Any:
    return started_backend("kubernetes", **cluster.options(**{**FAST, "pool_size": 0, **options}))


def runner_env(pod_or_job: Object) -> dict[str, str]:
    spec = pod_or_job["spec"]
    spec = spec["template"]["spec"] if "template" in spec else spec
    (runner,) = spec["containers"]
    return {e["name"]: e.get("value", "") for e in runner["env"]}


def claim(pod: Object, token: str | None = None) -> executor_pb2.ClaimResponse:
    """Play a pod's runner: Claim with the pod's token (or `token`) at the address in its spec."""
    env = runner_env(pod)
    with grpc.insecure_channel(env[kubernetes.ADDRESS_VARIABLE]) as channel:
        stub = executor_pb2_grpc.SandboxRunnerServiceStub(channel)
        request = executor_pb2.ClaimRequest(claim_token=token or env[CLAIM_TOKEN_VARIABLE])
        return stub.Claim(request, timeout=20)


def playing(cluster: LocalCluster, then: Any) -> list[Object]:
    """Pods are not started by the kubelet: each is marked Running and `then(cluster, pod)` runs in
    a thread of its own. The pods seen, in order."""
    seen: list[Object] = []

    def behaviour(_: LocalCluster, pod: Object) -> bool:
        seen.append(pod)
        cluster.running(pod)
        threading.Thread(target=then, args=(cluster, pod), daemon=True).start()
        return True

    cluster.behaviour = behaviour
    return seen


def wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the Job ---------------------------------------------------------------------------------------


def test_the_job_holds_nothing_of_the_run_and_is_the_template_with_its_limits(cluster: LocalCluster) -> None:
    spec = RunSpec(
        "python",
        SECRET_CODE
        + "\nimport os, sys\nprint(sys.stdin.read(), os.environ['TOKEN'], os.read(3, 100).decode())",
        stdin=SECRET_STDIN,
        env={"TOKEN": SECRET_ENV},
        private_input=SECRET_PASSWORD,
        files={"data.txt": b"s3cret-file"},
        limits=Limits(memory_bytes=128 << 20, tmp_bytes=32 << 20, cpus=0.5, timeout_seconds=7),
    )
    with backend(cluster) as sandbox:
        result = sandbox.run(spec)
    assert result.stdout == "the code of s3cret-code\ns3cret-stdin s3cret-env-value s3cret-password\n"
    for request in cluster.api.requests:  # no request to the API carries anything of the run
        assert "s3cret" not in json.dumps([request.path, request.query, request.body])
    (created,) = cluster.api.made("POST", "jobs")
    job = created.body
    sandbox_id = job["metadata"]["labels"][kubernetes.SANDBOX_LABEL]
    assert job["metadata"] == {
        "name": f"sandbox-{sandbox_id}",
        "namespace": NAMESPACE,
        "labels": {
            "app.kubernetes.io/part-of": "pyth-on",
            "app.kubernetes.io/component": "sandbox",
            kubernetes.EXECUTOR_LABEL: "executor-test-0",
            kubernetes.SANDBOX_LABEL: sandbox_id,
        },
    }
    deadline = 120 + 60 + 5  # spawn_timeout + max_timeout_seconds + the report's grace
    assert {k: v for k, v in job["spec"].items() if k != "template"} == {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": 60,
        "activeDeadlineSeconds": deadline,
    }
    pod = job["spec"]["template"]
    assert "annotations" not in pod["metadata"]
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/name": "sandbox-runner",
        "app.kubernetes.io/part-of": "pyth-on",
        "app.kubernetes.io/component": "sandbox",
        kubernetes.EXECUTOR_LABEL: "executor-test-0",
        kubernetes.SANDBOX_LABEL: sandbox_id,
    }
    pod_spec = pod["spec"]
    assert pod_spec["runtimeClassName"] == "gvisor"
    assert pod_spec["automountServiceAccountToken"] is False and pod_spec["enableServiceLinks"] is False
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["activeDeadlineSeconds"] == deadline
    (runner,) = pod_spec["containers"]
    env = runner_env(job)
    assert set(env) == {kubernetes.ADDRESS_VARIABLE, CLAIM_TOKEN_VARIABLE, "PYTHONDONTWRITEBYTECODE"}
    assert env[kubernetes.ADDRESS_VARIABLE].startswith("127.0.0.1:") and len(env[CLAIM_TOKEN_VARIABLE]) >= 40
    assert runner["command"] == ["python3", "-m", "services.executor.sandbox.pod_runner"]
    assert runner["args"] == ["--executor", "$(PYTHONON_SANDBOX_EXECUTOR_ADDRESS)"]
    # The pod is made for the default limits' profile, not this run's (its profile: 128 MiB, 2 x
    # 32 MiB of memory volumes, the runner's 48 MiB; half a core).
    memory = str((128 + 2 * 32 + 48) << 20)
    assert runner["resources"]["limits"] == {"cpu": "500m", "memory": memory, "ephemeral-storage": "128Mi"}
    assert runner["resources"]["requests"]["memory"] == memory
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod_spec["volumes"]} == {
        "tmp": str(32 << 20),
        "workspace": str(32 << 20),
    }
    assert runner["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_finished_run_deletes_its_job_and_its_pod(cluster: LocalCluster) -> None:
    with backend(cluster) as sandbox:
        assert sandbox.python("print('done')").stdout == "done\n"
        wait_for(lambda: not cluster.api.jobs() and not cluster.api.pods())
        (deleted,) = cluster.api.made("DELETE", "jobs")
        assert deleted.query == {"propagationPolicy": "Background", "gracePeriodSeconds": "0"}
        # The pod's process was sent SIGKILL as the pod went; it is gone once the kernel is done.
        wait_for(lambda: cluster.live_processes() == [])


# -- what a pod mounts: a package environment, and nothing of the executor's host ------------------


def package_store(root: Path) -> tuple[Path, str]:
    """A store laid out as the packages service's (environments/<key>/<instance>) with one
    environment holding a module; the store and the environment's path in it."""
    relative = "environments/" + "ab" * 32 + "/i-0"
    module = root / relative / "greeting"
    module.mkdir(parents=True)
    (module / "__init__.py").write_text("WORD = 'from the volume'\n")
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return root, relative


def pod_spec(job: Object) -> Object:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]  # JSON


def test_a_package_environment_is_the_store_claim_read_only_at_its_subpath_and_kept_warm(
    tmp_path: Path,
) -> None:
    store, relative = package_store(tmp_path / "store")
    spec = RunSpec(
        "python",
        "import greeting, os\nprint(greeting.WORD, os.environ['TOKEN'], sorted(os.listdir('/opt/pythonon/packages')))",
        env={"TOKEN": SECRET_ENV, "PYTHONPATH": SANDBOX_MOUNT},
        readonly_paths=((str(store / relative), SANDBOX_MOUNT),),
    )
    with (
        local_cluster(volumes={"package-environments": str(store)}) as cluster,
        started_backend(
            "kubernetes", **cluster.options(**FAST, pool_size=1, packages_dir=str(store))
        ) as sandbox,
    ):
        wait_for(lambda: len(cluster.api.made("POST", "jobs")) == 1)  # the default profile's warm pod
        result = sandbox.run(spec)
        assert (result.stdout, result.stderr) == ("from the volume s3cret-env-value ['greeting']\n", "")
        first, made_for_run = cluster.api.made("POST", "jobs")[:2]
        spec_of_run = pod_spec(made_for_run.body)
        # Exactly the template's two memory volumes and the store's claim, read-only twice over.
        assert spec_of_run["volumes"] == [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(64 << 20)}},
            {"name": "workspace", "emptyDir": {"medium": "Memory", "sizeLimit": str(64 << 20)}},
            {
                "name": kubernetes.PACKAGES_VOLUME,
                "persistentVolumeClaim": {"claimName": "package-environments", "readOnly": True},
            },
        ]
        assert spec_of_run["containers"][0]["volumeMounts"] == [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "workspace", "mountPath": "/workspace"},
            {
                "name": kubernetes.PACKAGES_VOLUME,
                "mountPath": SANDBOX_MOUNT,
                "subPath": relative,
                "readOnly": True,
            },
        ]
        assert set(runner_env(made_for_run.body)) == {
            kubernetes.ADDRESS_VARIABLE,
            CLAIM_TOKEN_VARIABLE,
            "PYTHONDONTWRITEBYTECODE",
        }
        # The warm pod of the default profile mounts nothing of the store.
        assert all("persistentVolumeClaim" not in volume for volume in pod_spec(first.body)["volumes"])
        # The environment is kept warm now: the next run of it takes a pod that already mounts it.
        wait_for(
            lambda: (
                sum(
                    kubernetes.PACKAGES_VOLUME in json.dumps(pod_spec(r.body))
                    for r in cluster.api.made("POST", "jobs")
                )
                == 2
            )
        )
        pool = sandbox.backend._pool  # noqa: SLF001 - when both waiting pods have claimed
        wait_for(lambda: sum(pool.ready(key) for key in pool.keys()) == 2, seconds=60)
        (warm,) = [
            r.body["metadata"]["name"]
            for r in cluster.api.made("POST", "jobs")
            if kubernetes.PACKAGES_VOLUME in json.dumps(r.body) and r is not made_for_run
        ]
        assert sandbox.run(spec).stdout.startswith("from the volume ")
        # It ran in that pod (a waiting pod is deleted only once used, or at close).
        wait_for(lambda: any(r.path.endswith(f"/jobs/{warm}") for r in cluster.api.made("DELETE", "jobs")))
        assert not (store / relative / "greeting" / "__pycache__").exists()
    for request in cluster.api.requests:
        assert "s3cret" not in json.dumps([request.path, request.query, request.body])


def test_read_only_mounts_a_pod_cannot_have_are_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    store, relative = package_store(tmp_path / "store")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with backend(cluster, packages_dir=str(store)) as sandbox:
        for readonly_paths, message in (
            (
                [(str(outside), "/opt/env")],
                f"a read-only mount of the executor's {outside} cannot reach a sandbox pod",
            ),
            (
                [(str(outside), SANDBOX_MOUNT)],
                f"the package environment {outside} is not in the packages volume",
            ),
            ([(str(store), SANDBOX_MOUNT)], f"the package environment {store} is not in the packages volume"),
        ):
            with pytest.raises(ValueError, match="^" + re.escape(message)):
                sandbox.run(RunSpec("python", "print(1)", readonly_paths=readonly_paths))
    with (
        backend(cluster, packages_claim=None, packages_dir=None) as sandbox,
        pytest.raises(ValueError) as refused,
    ):
        sandbox.run(RunSpec("python", "print(1)", readonly_paths=[(str(store / relative), SANDBOX_MOUNT)]))
    assert str(refused.value).startswith("package environments are not available on this kubernetes sandbox")
    assert cluster.api.made("POST", "jobs") == []  # refused before any pod


def test_an_encrypted_run_is_decrypted_in_the_pod_from_the_image_and_its_password_is_never_in_a_spec(
    cluster: LocalCluster,
) -> None:
    code = "print('clear ' + 's3cret-zk-code')"
    sealed = encrypted_runs.SealedCode(
        recipe.encrypt(code, SECRET_PASSWORD.decode(), recipe.KdfParams(8 * 1024, 1, 1)),
        SECRET_PASSWORD.decode(),
    )
    with backend(cluster) as sandbox:
        spec = sealed.spec(RunSpec("python", ""), sandbox.backend.languages())
        assert spec.readonly_paths  # the host backends' binds of the decryptor...
        result = sandbox.run(spec)
    assert (result.stdout, result.stderr, result.exit_code) == ("clear s3cret-zk-code\n", "", 0)
    (created,) = cluster.api.made("POST", "jobs")
    # ...which a pod does without: the image has the decryptor, so the pod is the template's.
    assert [volume["name"] for volume in pod_spec(created.body)["volumes"]] == ["tmp", "workspace"]
    for request in cluster.api.requests:
        assert "s3cret" not in json.dumps([request.path, request.query, request.body])
        assert sealed.payload.to_json()["ciphertext"] not in json.dumps(request.body)


# -- tokens ----------------------------------------------------------------------------------------


def test_a_replayed_claim_token_and_an_unknown_report_token_are_refused(cluster: LocalCluster) -> None:
    with backend(cluster) as sandbox:
        assert sandbox.python("print('first')").stdout == "first\n"
        (created,) = cluster.api.made("POST", "jobs")
        with pytest.raises(grpc.RpcError) as replayed:
            claim(created.body)  # the token its runner used a moment ago
        assert replayed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert replayed.value.details() == "unknown or already used claim token"
        with pytest.raises(grpc.RpcError) as forged:
            claim(created.body, token="a" * 43)
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        address = runner_env(created.body)[kubernetes.ADDRESS_VARIABLE]
        with grpc.insecure_channel(address) as channel:
            stub = executor_pb2_grpc.SandboxRunnerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as report:
                stub.Report(executor_pb2.ReportRequest(report_token="b" * 43, stdout=b"forged"), timeout=5)
        assert report.value.code() == grpc.StatusCode.PERMISSION_DENIED
        sandbox.assert_healthy()


def test_a_claim_token_is_used_once_even_while_its_pod_waits_for_a_run(cluster: LocalCluster) -> None:
    claimed = threading.Event()

    def waiting_runner(_: LocalCluster, pod: Object) -> None:
        claimed.set()
        with pytest.raises(grpc.RpcError):
            claim(pod)  # waits for a run until the backend closes and retires it

    pods = playing(cluster, waiting_runner)
    with backend(cluster, pool_size=1, spawn_timeout=5):
        assert claimed.wait(10)
        time.sleep(0.5)  # its claim is in
        with pytest.raises(grpc.RpcError) as replayed:
            claim(pods[0])
        assert replayed.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_presented_from_another_address_is_refused_and_its_pod_deleted(cluster: LocalCluster) -> None:
    """The pod's IP (as the API says) is 127.0.0.2; its runner, and the test, call from 127.0.0.1:
    as if the token had been read from the spec and used elsewhere."""
    cluster.pod_ip = "127.0.0.2"
    with backend(cluster, spawn_timeout=10) as sandbox:
        started = time.monotonic()
        with pytest.raises(SandboxError) as failed:
            sandbox.python("print('never')")
        assert time.monotonic() - started < 8  # ended by the refusal, not by the spawn timeout
        assert "ended before its runner claimed a run: TokenMisused" in str(failed.value)
        (pod,) = [r.body for r in cluster.api.made("POST", "jobs")]
        wait_for(lambda: len(cluster.runner_stderr) == 1)
        (stderr,) = cluster.runner_stderr.values()
        # The executor deletes the pod as it refuses the claim, and the stand-in kubelet kills at
        # once (a real one gives the grace period): the runner may be gone before it says why.
        assert stderr in (
            b"pod_runner: the claim was refused: PERMISSION_DENIED this claim token belongs to another pod\n",
            b"",
        )
        assert [r.path.rsplit("/", 1)[1] for r in cluster.api.made("DELETE", "jobs")] == [
            pod["metadata"]["name"]
        ]
        with pytest.raises(grpc.RpcError) as again:
            claim(pod)  # burnt: not even the right pod could use it now
        assert again.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_runner_never_sees_its_token_again_and_the_program_cannot_read_the_runners_memory(
    cluster: LocalCluster,
) -> None:
    code = """
import os
def read(path):
    try:
        return open(path, "rb").read()
    except OSError as error:
        return type(error).__name__.encode()
print(read("/proc/1/environ")[:20], read("/proc/1/mem")[:20], os.getppid())
"""
    with backend(cluster) as sandbox:
        result = sandbox.python(code)
    token = runner_env(cluster.api.made("POST", "jobs")[0].body)[CLAIM_TOKEN_VARIABLE]
    assert token not in result.stdout
    assert result.stdout.startswith("b'PermissionError' b'PermissionError'"), result.stdout


# -- the warm pool ---------------------------------------------------------------------------------


def test_a_warm_pod_serves_a_run_without_a_pod_start(cluster: LocalCluster) -> None:
    with backend(cluster, pool_size=1) as sandbox:
        pool = sandbox.backend._pool  # noqa: SLF001 - until the pod warmed at start has claimed
        wait_for(lambda: sum(pool.ready(key) for key in pool.keys()) == 1, seconds=60)
        (warm,) = [r.body["metadata"]["name"] for r in cluster.api.made("POST", "jobs")]
        assert sandbox.python("print('warm')").stdout == "warm\n"
        # It ran in the warm pod (a waiting pod is deleted only once used, or at close), and one
        # pod is started after the answer to refill the pool, none for the run. (Not timed: on a
        # loaded machine a warm run can take as long as a pod start here.)
        wait_for(lambda: any(r.path.endswith(f"/jobs/{warm}") for r in cluster.api.made("DELETE", "jobs")))
        wait_for(lambda: len(cluster.api.jobs()) == 1 and len(cluster.api.made("POST", "jobs")) == 2)
        time.sleep(0.5)
        assert len(cluster.api.made("POST", "jobs")) == 2


# -- how runs end ----------------------------------------------------------------------------------


def test_a_runner_that_never_reports_is_timed_out_and_its_pod_deleted(cluster: LocalCluster) -> None:
    playing(cluster, lambda _, pod: claim(pod))  # claims, then says nothing
    with backend(cluster) as sandbox:
        started = time.monotonic()
        result = sandbox.python("print('x')", limits=Limits(timeout_seconds=1))
        elapsed = time.monotonic() - started
        assert (result.timed_out, result.exit_code, result.stdout) == (True, 137, "")
        assert result.stderr == "[sandbox] execution timed out after 1 s\n"
        assert 1 + kubernetes.REPORT_GRACE_SECONDS <= elapsed < 1 + kubernetes.REPORT_GRACE_SECONDS + 3
        wait_for(lambda: len(cluster.api.made("DELETE", "jobs")) == 1 and not cluster.api.pods())


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            {"reason": "OOMKilled", "exit_code": 137},
            "[sandbox] memory limit of 256 MiB exceeded\n",
        ),
        (
            {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "Pod ephemeral local storage usage exceeds the total limit of containers 128Mi.",
            },
            "[sandbox] the sandbox pod was stopped by Kubernetes (Evicted: Pod ephemeral local storage "
            "usage exceeds the total limit of containers 128Mi.); the run did not finish\n",
        ),
    ],
    ids=["oom-killed", "evicted"],
)
def test_a_pod_killed_by_kubernetes_ends_the_run_clearly(
    cluster: LocalCluster, status: dict[str, Any], expected: str
) -> None:
    def killed(cluster: LocalCluster, pod: Object) -> None:
        claim(pod)
        time.sleep(0.3)
        meta = pod["metadata"]
        if status["reason"] == "OOMKilled":
            cluster.terminated(pod, 137, "OOMKilled")
        else:
            cluster.api.set_pod_status(meta["namespace"], meta["name"], status)

    playing(cluster, killed)
    with backend(cluster) as sandbox:
        started = time.monotonic()
        result = sandbox.python("data = b'x' * (1 << 30)")
        assert time.monotonic() - started < 3
        assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (
            137,
            "",
            expected,
            False,
        )
        wait_for(lambda: len(cluster.api.made("DELETE", "jobs")) == 1)


def test_a_pod_that_is_never_scheduled_fails_the_run_with_the_schedulers_reason(
    cluster: LocalCluster,
) -> None:
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."

    def unschedulable(cluster: LocalCluster, pod: Object) -> bool:
        meta = pod["metadata"]
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        cluster.api.set_pod_status(
            meta["namespace"], meta["name"], {"phase": "Pending", "conditions": [condition]}
        )
        return True

    cluster.behaviour = unschedulable
    with backend(cluster, spawn_timeout=1.5) as sandbox:
        with pytest.raises(SandboxError) as failed:
            sandbox.python("print('never')")
        assert str(failed.value).endswith(
            f"did not start within 1.5 s: not scheduled (Unschedulable): {message}"
        )
        wait_for(lambda: len(cluster.api.made("DELETE", "jobs")) == 1 and not cluster.api.jobs())


def test_a_cancelled_run_deletes_its_pod(cluster: LocalCluster) -> None:
    with backend(cluster) as sandbox:

        async def cancelled() -> None:
            run = asyncio.ensure_future(sandbox.backend.run(RunSpec("python", "import time\ntime.sleep(30)")))
            await asyncio.sleep(1.5)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

        sandbox.loop.call(cancelled())
        wait_for(lambda: not cluster.api.jobs() and cluster.live_processes() == [])


def test_a_run_cancelled_while_its_pod_starts_deletes_the_pod(cluster: LocalCluster) -> None:
    seen = playing(cluster, lambda _cluster, _pod: None)  # running, its runner never claims
    with backend(cluster) as sandbox:

        async def cancelled() -> None:
            run = asyncio.ensure_future(sandbox.backend.run(RunSpec("python", "print(1)")))
            await asyncio.sleep(1)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

        sandbox.loop.call(cancelled())
        wait_for(lambda: not cluster.api.jobs())  # not left to its deadline
        (deleted,) = cluster.api.made("DELETE", "jobs")
        assert deleted.path.endswith("/jobs/" + seen[0]["metadata"]["labels"]["job-name"])


# -- the API ---------------------------------------------------------------------------------------


def test_the_watch_resumes_from_where_it_was(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubernetes, "WATCH_SECONDS", 1)
    with backend(cluster) as sandbox:
        assert sandbox.python("print(1)").stdout == "1\n"
        wait_for(lambda: len([r for r in cluster.api.requests if r.query.get("watch")]) >= 3)
        watches = [r.query for r in cluster.api.requests if r.query.get("watch")]
        assert watches[0]["labelSelector"] == f"{kubernetes.EXECUTOR_LABEL}=executor-test-0"
        assert "resourceVersion" not in watches[0]
        assert all(int(w["resourceVersion"]) > 0 for w in watches[2:])  # not from scratch again
        assert sandbox.python("print(2)").stdout == "2\n"


def test_a_watch_whose_resource_version_expired_starts_again_from_now(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server compacted its history past where the watch was (410 Gone): the watch starts
    again without a resourceVersion, listing the pods as they are, and runs go on."""
    monkeypatch.setattr(kubernetes, "WATCH_SECONDS", 1)
    with backend(cluster) as sandbox:
        assert sandbox.python("print(1)").stdout == "1\n"
        wait_for(
            lambda: any("resourceVersion" in r.query for r in cluster.api.requests if r.query.get("watch"))
        )
        cluster.api.compact()
        compacted = len(cluster.api.requests)
        wait_for(
            lambda: any(
                r.query.get("watch") and "resourceVersion" not in r.query
                for r in cluster.api.requests[compacted:]
            )
        )
        assert sandbox.python("print(2)").stdout == "2\n"


def test_orphans_of_this_executor_are_reaped_at_start_and_other_executors_pods_are_not(
    cluster: LocalCluster,
) -> None:
    def put(kind: str, name: str, executor: str) -> None:
        labels = {kubernetes.EXECUTOR_LABEL: executor, kubernetes.SANDBOX_LABEL: name}
        pod_spec = {"containers": [{"name": "runner", "image": "pyth-on/sandbox"}]}
        spec = {"template": {"spec": pod_spec}} if kind == "jobs" else pod_spec
        body: Object = {"metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}, "spec": spec}
        cluster.api.put(kind, body)

    put("jobs", "sandbox-left1", "executor-test-0")
    put("pods", "sandbox-left1-abc", "executor-test-0")
    put("jobs", "sandbox-other", "executor-test-1")
    put("pods", "sandbox-other-abc", "executor-test-1")
    with backend(cluster):
        deleted = sorted(r.path.rsplit("/", 1)[1] for r in cluster.api.requests if r.method == "DELETE")
        assert deleted == ["sandbox-left1", "sandbox-left1-abc"]
        assert {j["metadata"]["name"] for j in cluster.api.jobs()} == {"sandbox-other"}


def test_two_replicas_share_one_cluster_each_with_its_own_pods(cluster: LocalCluster) -> None:
    """Two executor replicas on one sandbox namespace: runs of both at once go to their own pods,
    and one replica closing (a rollout) deletes its own Jobs only, while the other runs on."""

    def owners() -> set[str]:
        return {j["metadata"]["labels"][kubernetes.EXECUTOR_LABEL] for j in cluster.api.jobs()}

    with backend(cluster, pool_size=1, executor_id="executor-test-1") as second:
        with backend(cluster, pool_size=1) as first:
            results: dict[str, str] = {}

            def run(name: str, sandbox: Any) -> None:
                results[name] = sandbox.python(f"print('{name}')").stdout

            threads = [
                threading.Thread(target=run, args=(f"{name}-{i}", sandbox))
                for i in range(3)
                for name, sandbox in (("first", first), ("second", second))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert results == {f"{n}-{i}": f"{n}-{i}\n" for i in range(3) for n in ("first", "second")}
            wait_for(lambda: owners() == {"executor-test-0", "executor-test-1"})  # each one's warm pod
        wait_for(lambda: owners() == {"executor-test-1"})
        assert second.python("print('still')").stdout == "still\n"


def test_a_missing_permission_is_named(cluster: LocalCluster) -> None:
    cluster.api.forbid("get", "podtemplates")
    denied = create_backend("kubernetes", **cluster.options(**FAST))
    with pytest.raises(SandboxUnavailable) as refused:
        asyncio.run(denied.start())
    asyncio.run(denied.close())
    assert str(refused.value) == (
        "the executor's service account may not get podtemplate pythonon-sandbox/pythonon-sandbox-runner "
        '(403 Forbidden: podtemplates is forbidden: User "system:serviceaccount:pythonon:executor" cannot '
        'get resource "podtemplates" in API group "" in the namespace "pythonon-sandbox"); check the Role '
        "executor-sandbox in k8s/base/sandbox/rbac.yaml is applied and bound"
    )
    cluster.api.forbidden.clear()
    cluster.api.forbid("create", "jobs")
    with backend(cluster) as sandbox, pytest.raises(SandboxError) as failed:
        sandbox.python("print(1)")
    assert str(failed.value).startswith(
        "the executor's service account may not create jobs in pythonon-sandbox (403 Forbidden: jobs is forbidden"
    )


def test_close_leaves_no_job_pod_or_runner(cluster: LocalCluster) -> None:
    with backend(cluster, pool_size=2) as sandbox:
        wait_for(lambda: len(cluster.live_processes()) == 2)
        assert sandbox.python("print(1)").stdout == "1\n"
    wait_for(lambda: not cluster.api.jobs() and not cluster.api.pods() and cluster.live_processes() == [])


def test_close_while_a_job_is_being_created_deletes_it_once_created(cluster: LocalCluster) -> None:
    """The refill's API call is under way (slow, as under load) when the pool closes: the Job is
    deleted after the call's answer, not before it (a deletion sent first finds nothing)."""
    creating, created = threading.Event(), threading.Event()
    with backend(cluster, pool_size=2) as sandbox:
        wait_for(lambda: len(cluster.live_processes()) == 2)
        create = sandbox.backend._batch.create_namespaced_job

        def slow_create(namespace: str, job: Any) -> Any:
            creating.set()
            time.sleep(0.5)
            answer = create(namespace, job)
            created.set()
            return answer

        sandbox.backend._batch.create_namespaced_job = slow_create
        assert sandbox.python("print(1)").stdout == "1\n"  # its refill creates a Job, slowly
        assert creating.wait(10)
        assert not created.is_set()
    assert created.is_set()  # close waited for the call it cancelled
    wait_for(lambda: not cluster.api.jobs() and not cluster.api.pods() and cluster.live_processes() == [])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"callback_address": ""}, "option callback_address: expected host:port"),
        ({"executables": {"python": "/usr/bin/python3"}}, "option executables: the kubernetes backend runs"),
        ({"namespace": "Not_A_Name"}, "option namespace: expected a Kubernetes name"),
        ({"executor_id": "x" * 64}, "option executor_id: expected a label value"),
        ({"packages_claim": "package-environments"}, "options packages_claim and packages_dir go together"),
        (
            {"packages_claim": "Not_A_Name", "packages_dir": "/store"},
            "option packages_claim: expected a Kubernetes",
        ),
        (
            {"packages_claim": "store", "packages_dir": "store"},
            "option packages_dir: expected an absolute path",
        ),
    ],
)
def test_bad_options_are_refused_before_anything_starts(options: dict[str, Any], message: str) -> None:
    good = {"callback_address": "10.0.0.5:50052"}
    with pytest.raises(BackendOptionError) as refused:
        backend_options("kubernetes", {**good, **options})
    assert str(refused.value).startswith(message)
