"""A cluster on this machine for the kubernetes backend's tests: the mock API server
(mock_kubernetes.py) and a stand-in kubelet that, when a sandbox pod is created, starts what its
spec says (the runner container's command, args and env, `$(VAR)` expanded as the kubelet does)
inside bubblewrap: a read-only root of the host's /usr and /etc, a pid namespace where the runner
is pid 1, uid 65534, /tmp, /workspace and /dev/shm as tmpfs of the pod's sizes, and each
persistentVolumeClaim volume the runner mounts bound from the directory that stands for its volume
(`volumes`), at its subPath, read-only when the pod says so (and only then). The pod's IP is
127.0.0.1, from where the runner calls the executor, so the pull/push protocol runs for real.

The image's `python3` (which has grpcio and protobuf) is this virtualenv's interpreter; the image's
PYTHONPATH is the repository and gen/; the decryptor and its libraries that the image installs under
/opt/pythonon-zk are this virtualenv's, bound where the image has them. What a real node adds
(gVisor, the pod's cgroup limits, NetworkPolicies) is not here: the contract cases that need it are
skipped with that reason."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.executor import encrypted_runs
from services.executor.sandbox import zk_decryptor
from services.executor.sandbox.bwrap import find_bwrap
from services.executor.sandbox.process import descendants_of
from tests.sandbox.conftest import BackendFactory, Sandbox, started_backend
from tests.sandbox.mock_kubernetes import MockKubernetes, Object

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "pythonon-sandbox"
TEMPLATE_FILE = ROOT / "k8s" / "base" / "sandbox" / "pod-template.yaml"
POD_IP = "127.0.0.1"
# The claim of the package environments' store in the sandbox namespace (k8s/base/sandbox/).
PACKAGES_CLAIM = "package-environments"
# What every container status has (the client's models require these fields).
# Every pod process any local cluster started, whatever became of its cluster: killed when the
# test process ends, so that none outlives it (a pod's outer bwrap has no parent-death signal; two
# were once found with parent 1, their runner waiting for an executor long gone).
_STARTED: list[subprocess.Popen[bytes]] = []
_STARTED_LOCK = threading.Lock()


def _kill_pod(process: subprocess.Popen[bytes]) -> None:
    """Kill a pod's bwrap and everything under it. Killing bwrap alone is not enough: its child,
    when caught waiting for bwrap to write its user namespace's uid map (a read of an eventfd, which
    no death ends), would wait forever with parent 1. So bwrap is stopped first (it can start no
    more), its descendants are found and killed, then bwrap."""
    if process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        os.kill(process.pid, signal.SIGSTOP)
        for pid in descendants_of(process.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        process.kill()


@atexit.register
def _kill_every_pod_process() -> None:
    with _STARTED_LOCK:
        for process in _STARTED:
            _kill_pod(process)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


CONTAINER = {"name": "runner", "image": "pyth-on/sandbox", "imageID": "", "restartCount": 0}
# What a pod does instead of running its runner (tests of pods that never start, OOM, eviction).
Behaviour = Callable[["LocalCluster", Object], bool]


def pod_template() -> Object:
    import yaml

    return yaml.safe_load(TEMPLATE_FILE.read_text())  # type: ignore[no-any-return]  # a mapping


def _size(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


@dataclass
class LocalCluster:
    api: MockKubernetes = field(default_factory=MockKubernetes)
    pod_ip: str = POD_IP
    # Called for each created pod before the kubelet starts it; True: the kubelet does nothing more.
    behaviour: Behaviour | None = None
    # claimName -> the directory standing for its volume (a PV of the store); tests build their
    # environments under the temporary directory.
    volumes: dict[str, str] = field(
        default_factory=lambda: {PACKAGES_CLAIM: os.path.realpath(tempfile.gettempdir())}
    )
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Pods deleted before their process was started (the API answers before the kubelet acts).
    deleted: set[str] = field(default_factory=set)
    closed: bool = False  # no pod process starts after close (it would outlive the test)
    _started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    runner_stderr: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.api.put("podtemplates", pod_template())
        self.api.kubelet = self._start_pod
        self.api.on_pod_deleted = self._stop_pod
        self._scratch = Path(tempfile.mkdtemp(prefix="local-cluster-"))

    def options(self, **extra: Any) -> dict[str, Any]:
        return {
            "kubeconfig": self.api.kubeconfig(self._scratch),
            "namespace": NAMESPACE,
            "callback_address": "127.0.0.1:0",
            "listen_address": "127.0.0.1:0",
            "executor_id": "executor-test-0",
            "packages_claim": PACKAGES_CLAIM,
            "packages_dir": self.volumes[PACKAGES_CLAIM],
            **extra,
        }

    def running(self, pod: Object, ip: str | None = None) -> None:
        meta = pod["metadata"]
        self.api.set_pod_status(
            meta["namespace"],
            meta["name"],
            {
                "phase": "Running",
                "podIP": ip or self.pod_ip,
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{**CONTAINER, "ready": True, "state": {"running": {}}}],
            },
        )

    def terminated(self, pod: Object, exit_code: int, reason: str, phase: str = "", **status: Any) -> None:
        meta = pod["metadata"]
        self.api.set_pod_status(
            meta["namespace"],
            meta["name"],
            {
                "phase": phase or ("Succeeded" if exit_code == 0 else "Failed"),
                "containerStatuses": [
                    {
                        **CONTAINER,
                        "ready": False,
                        "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
                    }
                ],
                **status,
            },
        )

    def command(self, pod: Object) -> tuple[list[str], dict[str, str], dict[str, int]]:
        """What the kubelet would run for the runner container: argv, env and memory volumes' sizes."""
        (runner,) = [c for c in pod["spec"]["containers"] if c["name"] == "runner"]
        env = {e["name"]: e.get("value", "") for e in runner.get("env", [])}
        expand = lambda text: re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)  # noqa: E731
        argv = [expand(word) for word in runner["command"] + runner.get("args", [])]
        if argv[0] == "python3":
            argv[0] = sys.executable  # the image's python3, with grpcio and protobuf
        sizes = {
            mount["mountPath"]: _size(volume["emptyDir"]["sizeLimit"])
            for mount in runner.get("volumeMounts", [])
            for volume in pod["spec"].get("volumes", [])
            if volume["name"] == mount["name"] and "emptyDir" in volume
        }
        env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'gen'}"  # the image's ENV
        env["PYTHONUNBUFFERED"] = "1"
        return argv, env, sizes

    def claimed_volumes(self, pod: Object) -> list[tuple[str, str, bool]]:
        """The runner's persistentVolumeClaim mounts as (directory, mount path, read-only): the
        claim's directory at the mount's subPath, read-only if the mount or the volume says so."""
        (runner,) = [c for c in pod["spec"]["containers"] if c["name"] == "runner"]
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
        mounts = []
        for mount in runner.get("volumeMounts", []):
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            if claim is None:
                continue
            root = self.volumes[claim["claimName"]]  # KeyError: a claim no volume stands for
            sub_path = mount.get("subPath", "")
            assert not sub_path.startswith("/") and ".." not in sub_path.split("/"), sub_path  # noqa: S101
            read_only = bool(mount.get("readOnly") or claim.get("readOnly"))
            mounts.append((os.path.join(root, sub_path), mount["mountPath"], read_only))
        return mounts

    def _start_pod(self, pod: Object) -> None:
        if self.behaviour is not None and self.behaviour(self, pod):
            return
        argv, env, sizes = self.command(pod)
        bwrap = [find_bwrap(), "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-user"]
        bwrap += ["--uid", "65534", "--gid", "65534", "--as-pid-1", "--die-with-parent", "--new-session"]
        bwrap += ["--tmpfs", "/", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for name in ("bin", "lib", "lib64", "sbin"):
            target = os.readlink(f"/{name}") if os.path.islink(f"/{name}") else None
            bwrap += (
                ["--symlink", target, f"/{name}"] if target else ["--ro-bind-try", f"/{name}", f"/{name}"]
            )
        bwrap += ["--proc", "/proc", "--dev", "/dev", "--size", str(64 << 20), "--tmpfs", "/dev/shm"]
        for path, size in sizes.items():
            bwrap += ["--size", str(size), "--tmpfs", path]
        # After the pod's tmpfs mounts: a checkout under /tmp (a CI clone) would be hidden by them.
        for path in {str(ROOT), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}:
            bwrap += ["--ro-bind", path, path]
        for host, inside in image_layer():
            bwrap += ["--ro-bind", host, inside]
        for host, inside, read_only in self.claimed_volumes(pod):
            bwrap += ["--ro-bind" if read_only else "--bind", host, inside]
        # As in a pod: /dev and /proc/sys are not the program's to write (root's, or the kernel's).
        bwrap += ["--ro-bind", "/proc/sys", "/proc/sys", "--remount-ro", "/dev"]
        bwrap += ["--remount-ro", "/", "--chdir", "/tmp", "--"]
        self.running(pod)
        name = pod["metadata"]["name"]
        with self._lock:
            # As a kubelet: a pod deleted before its container started never runs (the deletion
            # may come while this thread was still on its way here).
            if name in self.deleted or self.closed:
                return
            process = subprocess.Popen(  # noqa: S603 - the pod's own command, in bwrap
                bwrap + argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self.processes[name] = process
            self._started.append(process)
            with _STARTED_LOCK:
                _STARTED.append(process)
        _, stderr = process.communicate()
        self.runner_stderr[name] = stderr
        code = process.returncode
        self.terminated(pod, code if code >= 0 else 128 - code, "Completed" if code == 0 else "Error")

    def _stop_pod(self, pod: Object) -> None:
        with self._lock:
            self.deleted.add(pod["metadata"]["name"])
            process = self.processes.get(pod["metadata"]["name"])
        if process is not None:
            _kill_pod(process)

    def live_processes(self) -> list[str]:
        with self._lock:
            return [name for name, process in self.processes.items() if process.poll() is None]

    def close(self) -> None:
        with self._lock:
            self.closed = True
            # Every process started, also one whose pod name a later pod took in `processes`.
            for process in self._started:
                _kill_pod(process)
            for process in self._started:
                process.wait()
        self.api.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def image_layer() -> list[tuple[str, str]]:
    """What containers/sandbox.Containerfile installs under /opt/pythonon-zk (the decryptor, its
    libraries, the recipe), as (this host's copy, the image's path)."""
    root = os.path.dirname(zk_decryptor.LIBRARIES) + "/"
    return [(host, inside) for host, inside in encrypted_runs.decryptor_binds() if inside.startswith(root)]


@contextlib.contextmanager
def local_cluster(**fields: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(**fields)
    try:
        yield cluster
    finally:
        cluster.close()


@dataclass(frozen=True)
class LocalClusterFactory(BackendFactory):
    """The kubernetes backend against a local cluster of its own, for the contract suite."""

    # Contract cases whose subject is what a node enforces (cgroups, gVisor, NetworkPolicies, the
    # image's root): test name -> why they cannot be shown without a cluster.
    needs_a_cluster: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, **overrides: Any) -> contextlib.AbstractContextManager[Sandbox]:
        return self._started({**self.options, **overrides})

    @contextlib.contextmanager
    def _started(self, options: Mapping[str, Any]) -> Iterator[Sandbox]:
        with (
            local_cluster() as cluster,
            started_backend("kubernetes", **cluster.options(**options)) as sandbox,
        ):
            yield sandbox


_NODE = "enforced by the pod's cgroup on a gVisor node; the local stand-in of a pod has no cgroup limit"
kubernetes_factory = LocalClusterFactory(
    "kubernetes",
    {"pool_size": 2, "max_concurrent": 24, "max_runs_per_user": 24, "max_waiting_per_user": 8},
    needs_a_cluster={
        "test_memory_bomb_is_killed_with_a_clear_message": _NODE,
        "test_a_run_gets_no_more_than_its_share_of_the_cpus": _NODE,
        "test_fork_bomb_is_held_to_the_process_limit": "RLIMIT_NPROC counts the uid in the pod's own "
        "kernel (gVisor); the local stand-in shares the host's",
        "test_shell_fork_bomb_is_contained": "as the fork bomb: the pod's kernel (gVisor) and pids cgroup",
        "test_network_egress_to_a_host_listener_fails_and_only_loopback_exists": "a sandbox pod's network is "
        "the namespace's NetworkPolicy (no egress but the executor's port); the local stand-in shares the "
        "host's network to reach the executor",
        "test_the_key_derivation_counts_against_the_runs_memory": "a pod's one memory bound is its cgroup "
        "(the run's memory, its two memory volumes and the runner's 48 MiB), on the node; the local "
        "stand-in has none. The executor refuses a payload whose key derivation does not fit the run's "
        "memory before any pod exists (SealedCode.check)",
        "test_readonly_paths_are_mounted_read_only": "a host path of the executor means nothing in a "
        "pod: the backend refuses read-only mounts but the package environment (from its volume)",
        "test_only_the_usual_socket_families_can_be_opened": "the families a pod can open are gVisor's",
        "test_a_routing_socket_reads_but_cannot_change_the_network": "a pod's network is its own (gVisor's "
        "netstack); the local stand-in shares the host's",
        "test_the_root_holds_only_what_the_runtime_needs": "a pod's root is the sandbox image's",
        "test_mountinfo_shows_no_path_of_the_mesh": "a pod's mounts are the image's and its volumes; the "
        "local stand-in binds the repository",
        # A checkout under /tmp (a CI clone) is bound into the stand-in pod's /tmp, which is then not
        # empty; a real pod's /tmp holds nothing of the image.
        **(
            {
                "test_filling_the_disk_fails_and_stays_in_the_sandbox": "the local stand-in binds this "
                "checkout, which lies under /tmp, into the pod's /tmp"
            }
            if ROOT.is_relative_to("/tmp")
            else {}
        ),
    },
)
