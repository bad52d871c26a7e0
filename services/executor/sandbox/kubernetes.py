"""The kubernetes backend: every run in a pod of its own, under gVisor, in the sandbox namespace.

Each sandbox is a Job (backoffLimit 0, ttlSecondsAfterFinished, activeDeadlineSeconds) made from
the PodTemplate the operator keeps in the cluster (k8s/base/sandbox/pod-template.yaml). Its pod's
runner (pod_runner.py) pulls its run from this executor replica over SandboxRunnerService.Claim
with a one-time claim token and pushes the result back with Report: nothing of a run (code, stdin,
secrets, passwords) is ever in a spec, an env var or an annotation. A warm pool keeps pods whose
runner already waits in Claim, so a run pays for no pod start; a run that finds none gets a Job of
its own.

The claim token is in the pod's environment, and it is not a secret worth stealing: it is accepted
once, only from the pod's own IP address as the API reports it, before any of the user's code
exists in the pod, and is worthless afterwards; the report token that proves the result travels only
in Claim's answer. A token presented from another address is burnt and its pod deleted.

Every Job and pod carries the replica's id (`pythonon.dev/executor`): a replica watches and reaps
only its own, and deletes what a predecessor of the same id left when it starts. A replica that is
gone for good leaves pods whose runners lose their connection and exit, and Jobs that the TTL then
removes. Timeouts, OOM kills, evictions and pods that never start end the run with a clear result
(docs/architecture.md, "Sandbox pods").

A user's package environment reaches the pod as a read-only volume: the PersistentVolumeClaim of
the sandbox namespace that holds the packages service's store (`packages_claim`), mounted with the
environment's own directory as `subPath`, so the pod sees that environment and nothing else of the
store. Encrypted runs' decryptor is the sandbox image's own (containers/sandbox.Containerfile)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from services.executor.sandbox.admission import Admission
from services.executor.sandbox.host_backend import (
    RECENT_MOUNT_PROFILES,
    BackendOptionError,
    BackendOptions,
    raise_option,
)
from services.executor.sandbox.interface import (
    Limits,
    OutputListener,
    RunResult,
    RunSpec,
    SandboxError,
    SandboxUnavailable,
    describe_bytes,
    result_of,
    validate_spec,
)
from services.executor.sandbox.languages import LANGUAGES, SMOKE_TEST_OUTPUT
from services.executor.sandbox.pod_runner import CLAIM_TOKEN_VARIABLE
from services.executor.sandbox.warm_pool import WarmPool
from services.platform.package_store import SANDBOX_MOUNT

log = logging.getLogger("pythonon.executor.sandbox.kubernetes")

EXECUTOR_LABEL = "pythonon.dev/executor"
SANDBOX_LABEL = "pythonon.dev/sandbox"
RUNNER_CONTAINER = "runner"
ADDRESS_VARIABLE = "PYTHONON_SANDBOX_EXECUTOR_ADDRESS"
PACKAGES_VOLUME = "package-environment"
# The runner's own interpreter and gRPC client, on top of what the run itself may use.
RUNNER_MEMORY_BYTES = 48 * 1024 * 1024
# After the run's timeout, how long the runner has to report (it stops the program itself).
REPORT_GRACE_SECONDS = 5.0
# How long the claim of a pod waits for the API to tell its IP address (the watch may lag).
POD_ADDRESS_WAIT_SECONDS = 5.0
WATCH_SECONDS = 30
# Runs at once per replica when max_concurrent is not set.
DEFAULT_SLOTS = 32
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class KubernetesOptions(BackendOptions):
    """Options of the kubernetes backend (those of BackendOptions too: pool_size is warm pods per
    limits profile, spawn_timeout how long a pod may take to be scheduled, pulled and claimed)."""

    namespace: str = "pythonon-sandbox"
    pod_template: str = "pythonon-sandbox-runner"
    # host:port at which the sandbox pods reach this replica's sandbox endpoint (its pod IP).
    callback_address: str = ""
    # Where that endpoint listens (default: every address, the callback address's port). A port of
    # 0 in both picks a free port (tests).
    listen_address: str | None = None
    # This replica's label value (default: the host name, which is the pod's name).
    executor_id: str | None = None
    # A kubeconfig file (default: the in-cluster service account).
    kubeconfig: str | None = None
    job_ttl_seconds: int = 60
    # Run each language's smoke test in a pod at start-up (a broken image is found before a user does).
    smoke_test: bool = True
    spawn_timeout: float = 120.0
    # The PersistentVolumeClaim in `namespace` that holds the package environments' store, and
    # where this executor sees the same store (PYTHONON_EXECUTOR_PACKAGES_DIR): an environment's
    # path under `packages_dir` is the subPath its pods mount. Unset: runs with packages are refused.
    packages_claim: str | None = None
    packages_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.executables:
            raise BackendOptionError("option executables: the kubernetes backend runs the sandbox image's")
        for name in ("namespace", "pod_template"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
                raise_option(name, "a Kubernetes name", value)
        if not isinstance(self.callback_address, str) or not _host_port(self.callback_address):
            raise_option(
                "callback_address",
                "host:port (the executor's address as the pods reach it)",
                self.callback_address,
            )
        if self.listen_address is not None and not _host_port(self.listen_address):
            raise_option("listen_address", "host:port", self.listen_address)
        if self.executor_id is not None and not _LABEL_VALUE.fullmatch(self.executor_id):
            raise_option(
                "executor_id", "a label value (63 characters: letters, digits, -_.)", self.executor_id
            )
        if self.kubeconfig is not None and not (
            isinstance(self.kubeconfig, str) and os.path.isabs(self.kubeconfig)
        ):
            raise_option("kubeconfig", "an absolute path", self.kubeconfig)
        if (
            isinstance(self.job_ttl_seconds, bool)
            or not isinstance(self.job_ttl_seconds, int)
            or self.job_ttl_seconds < 0
        ):
            raise_option("job_ttl_seconds", "an integer of at least 0", self.job_ttl_seconds)
        if not isinstance(self.smoke_test, bool):
            raise_option("smoke_test", "true or false", self.smoke_test)
        if self.packages_claim is not None and not (
            isinstance(self.packages_claim, str) and _DNS_LABEL.fullmatch(self.packages_claim)
        ):
            raise_option("packages_claim", "a Kubernetes name", self.packages_claim)
        if self.packages_dir is not None and not (
            isinstance(self.packages_dir, str) and os.path.isabs(self.packages_dir)
        ):
            raise_option("packages_dir", "an absolute path", self.packages_dir)
        if (self.packages_claim is None) != (self.packages_dir is None):
            raise BackendOptionError(
                "options packages_claim and packages_dir go together: set both or neither"
            )


def _host_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class PodProfile:
    """What a pod is made for, fixed when it starts: the limits without the timeout (the runner
    applies that per run), and the package environment it mounts (its subPath in the packages
    volume), if any. The warm pool keeps pods per profile."""

    limits: Limits
    environment: str | None = None


@dataclass(frozen=True)
class PodEnd:
    """How a sandbox pod ended, as the API tells it."""

    reason: str  # e.g. OOMKilled, Evicted, DeadlineExceeded, Deleted, Completed, Error
    message: str = ""

    @property
    def out_of_memory(self) -> bool:
        return self.reason == "OOMKilled"

    @property
    def evicted(self) -> bool:
        return self.reason == "Evicted"

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


@dataclass(frozen=True)
class Report:
    """What a pod's runner reported (SandboxRunnerService.Report)."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_seconds: float
    timed_out: bool
    overflowed: bool


@dataclass(eq=False)
class PodSandbox:
    """One sandbox pod (the pod of Job `sandbox-<id>`) and where its life stands."""

    id: str
    profile: PodProfile
    claim_token: str
    deadline_seconds: int
    started: float
    exited: asyncio.Future[PodEnd]
    claimed: asyncio.Future[None]  # its runner proved itself and waits for a run
    assignment: asyncio.Future[tuple[RunSpec, str]]  # the run and its report token
    result: asyncio.Future[Report]
    address_known: asyncio.Event = field(default_factory=asyncio.Event)
    pod_name: str | None = None
    pod_ip: str | None = None
    problem: str | None = None  # why it is not running yet (unschedulable, image pull)
    disposed: bool = False

    @property
    def job_name(self) -> str:
        return f"sandbox-{self.id}"


class ClaimRefused(Exception):
    """A claim or report token that is unknown, used, or presented from the wrong pod."""


class Retired(Exception):
    """A waiting pod the executor needs no more (its life is nearly over, or the backend closes)."""


def describe_api_error(error: ApiException, doing: str) -> str:
    """An API error in words an operator acts on: a 403 names the missing permission."""
    reason = ""
    try:
        import json

        reason = json.loads(error.body or "{}").get("message", "")
    except ValueError:
        reason = (error.body or "")[:200]
    if error.status == 403:
        return (
            f"the executor's service account may not {doing} (403 Forbidden: {reason or error.reason}); "
            "check the Role executor-sandbox in k8s/base/sandbox/rbac.yaml is applied and bound"
        )
    if error.status == 401:
        return f"the API refused the executor's credentials while trying to {doing} (401 Unauthorized)"
    return f"cannot {doing}: {error.status} {error.reason}{': ' + reason if reason else ''}"


class KubernetesBackend:
    name = "kubernetes"
    options_type: ClassVar[type[BackendOptions]] = KubernetesOptions

    def __init__(self, options: BackendOptions) -> None:
        if not isinstance(options, KubernetesOptions):
            raise TypeError("the kubernetes backend takes KubernetesOptions")
        self.options = options
        self.executor_id = options.executor_id or _label_safe(
            os.environ.get("HOSTNAME") or socket.gethostname()
        )
        configuration = client.Configuration()
        try:
            if options.kubeconfig:
                config.load_kube_config(config_file=options.kubeconfig, client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as error:
            raise SandboxUnavailable(f"the kubernetes backend has no API credentials: {error}") from None
        self._api = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api)
        self._batch = client.BatchV1Api(self._api)
        # The runs happen on other nodes: this replica's own memory and cores do not bound them; the
        # sandbox namespace's ResourceQuota bounds all replicas' pods together.
        self.max_concurrent = options.max_concurrent or DEFAULT_SLOTS
        self._admission = Admission(
            self.max_concurrent,
            options.max_runs_per_user or math.ceil(self.max_concurrent / 2),
            options.max_queue_seconds,
            options.max_waiting_per_user,
        )
        self._languages = list(options.languages or LANGUAGES)
        self.unavailable: dict[str, str] = {}
        self._pool: WarmPool[PodProfile, PodSandbox] = WarmPool(
            options.pool_size, self._spawn, self._dispose, lambda sandbox: sandbox.exited
        )
        self._template: dict[str, Any] = {}
        self._sandboxes: dict[str, PodSandbox] = {}
        self._claims: dict[str, PodSandbox] = {}
        self._reports: dict[str, PodSandbox] = {}
        self._deletions: set[asyncio.Task[None]] = set()
        self._endpoint: Any = None  # the gRPC server of kubernetes_endpoint, once started
        self._callback_address = options.callback_address
        self._watching = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

    # -- the contract ---------------------------------------------------------------------------

    def languages(self) -> list[str]:
        return list(self._languages)

    def enforced_limits(self) -> dict[str, bool]:
        # Memory, CPU, /tmp and the pod's life are the pod's resources and deadline (cgroups of the
        # node, under gVisor); the rest the runner sets for the program; the network is the
        # namespace's NetworkPolicies.
        return {
            "timeout": True,
            "output": True,
            "network": True,
            "memory": True,
            "processes": True,
            "cpu_time": True,
            "cpu_share": True,
            "file_size": True,
            "tmp_size": True,
            "non_root": True,
            "seccomp": True,
        }

    async def start(self) -> None:
        """Read the pod template, reap what a predecessor of this id left, open the sandbox
        endpoint, watch this replica's pods, smoke-test each language, then warm the pool."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._template = await self._read_template()
        await self.reap()
        from services.executor.sandbox import kubernetes_endpoint

        self._endpoint, port = await kubernetes_endpoint.serve(self, self._listen_address())
        host, callback_port = _host_port(self._callback_address) or ("", 0)
        if callback_port == 0:
            self._callback_address = f"{self._callback_address.rpartition(':')[0]}:{port}"
        self._watching.set()
        self._watch_thread = threading.Thread(target=self._watch_pods, name="sandbox-pod-watch", daemon=True)
        self._watch_thread.start()
        if self.options.smoke_test:
            await self._smoke_test()
        # Warmed in the background: a cold pod may take a while (an image pull), and the executor
        # should report SERVING without waiting for it (runs start pods of their own meanwhile).
        self._pool.keep_warm([self._profile(self.options.default_limits)])

    async def run(self, spec: RunSpec, on_output: OutputListener | None = None) -> RunResult:
        # The pod's runner reports the output once, with the result: `on_output` hears nothing.
        validate_spec(spec, {name: LANGUAGES[name].main_file for name in self._languages})
        profile = self._profile(spec.limits, self._environment_of(spec))
        if self._closed:
            raise SandboxError("the sandbox backend is closed")
        async with self._admission.slot(spec.owner):
            sandbox = await self._pool.take_or_wait(profile)
            if sandbox is None:
                sandbox = await self._spawn(profile)
            try:
                return await self._execute(sandbox, spec)
            finally:
                self._dispose(sandbox)
                if profile.environment is not None and not self._closed:
                    # As the host backends do: pods that already mount the environments used last.
                    self._pool.keep_recently_used(profile, RECENT_MOUNT_PROFILES)

    def replenish(self) -> None:
        self._pool.replenish()

    async def close(self) -> None:
        self._closed = True
        await self._pool.close()
        for sandbox in list(self._sandboxes.values()):
            self._dispose(sandbox)
        if self._deletions:
            await asyncio.gather(*list(self._deletions), return_exceptions=True)
        self._watching.clear()
        if self._endpoint is not None:
            await self._endpoint.stop(grace=1)
        await asyncio.to_thread(self._api.close)

    # -- what the sandbox endpoint asks (kubernetes_endpoint.py) --------------------------------

    async def claim(self, token: str, peer: str) -> tuple[RunSpec, str]:
        """The run for the pod holding `token`, once it is assigned; `peer` is the caller's address
        as gRPC saw it. Raises ClaimRefused (unknown, used, or from another address) or Retired."""
        sandbox = self._claims.pop(token, None)  # used from now on, whatever follows
        if sandbox is None or sandbox.disposed:
            raise ClaimRefused("unknown or already used claim token")
        address = await self._pod_address(sandbox)
        caller = peer_address(peer)
        if address is None or caller != address:
            log.warning(
                "the claim token of sandbox %s was presented from %s, not from its pod (%s): "
                "the pod is deleted",
                sandbox.job_name,
                caller,
                address,
            )
            self._end(sandbox, PodEnd("TokenMisused", "its claim token was presented from another address"))
            self._dispose(sandbox)
            raise ClaimRefused("this claim token belongs to another pod")
        if not sandbox.claimed.done():
            sandbox.claimed.set_result(None)
        # A waiting pod retires while it still has the time for the longest run.
        life_left = sandbox.deadline_seconds - (time.monotonic() - sandbox.started)
        waiting = life_left - self.options.max_timeout_seconds - REPORT_GRACE_SECONDS
        try:
            return await asyncio.wait_for(asyncio.shield(sandbox.assignment), max(waiting, 0.1))
        except (TimeoutError, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and not sandbox.assignment.cancelled():
                # The runner hung up (its pod died): the pool must not hand it out.
                self._end(sandbox, PodEnd("RunnerGone", "its runner disconnected while waiting"))
                raise
            self._end(sandbox, PodEnd("Retired", "waited for a run as long as its deadline allows"))
            raise Retired from None

    def report(self, token: str, report: Report) -> None:
        sandbox = self._reports.pop(token, None)
        if sandbox is None or sandbox.result.done():
            raise ClaimRefused("unknown or already used report token")
        sandbox.result.set_result(report)

    # -- a run ----------------------------------------------------------------------------------

    def _profile(self, limits: Limits, environment: str | None = None) -> PodProfile:
        return PodProfile(
            dataclasses.replace(limits, timeout_seconds=self.options.max_timeout_seconds), environment
        )

    def _environment_of(self, spec: RunSpec) -> str | None:
        """The subPath of the run's package environment in the packages volume (None: it has none).
        Host paths mean nothing in a pod: the environment is found in the volume, the decryptor of
        an encrypted run in the image, and any other read-only mount is refused (ValueError)."""
        environment = None
        for host, inside in spec.readonly_paths:
            if inside == SANDBOX_MOUNT and environment is None:
                environment = self._volume_path(host)
            elif not _image_provides(host, inside):
                raise ValueError(
                    f"a read-only mount of the executor's {host} cannot reach a sandbox pod: only the "
                    "user's package environment (from the packages volume) can"
                )
        return environment

    def _volume_path(self, host: str) -> str:
        """Where `host` (an environment as this executor sees it) lies in the packages volume."""
        if self.options.packages_claim is None or self.options.packages_dir is None:
            raise ValueError(
                "package environments are not available on this kubernetes sandbox backend (its options "
                "packages_claim and packages_dir are not set)"
            )
        store = os.path.realpath(self.options.packages_dir)
        path = os.path.realpath(host)
        relative = os.path.relpath(path, store)
        if relative == "." or relative == ".." or relative.startswith("../"):
            raise ValueError(f"the package environment {host} is not in the packages volume ({store})")
        return relative

    async def _spawn(self, profile: PodProfile) -> PodSandbox:
        """Make a sandbox Job and return it once its runner has claimed (proved itself and waits)."""
        if self._closed:
            raise SandboxError("the sandbox backend is closed")
        loop = asyncio.get_running_loop()
        sandbox = PodSandbox(
            id=secrets.token_hex(6),
            profile=profile,
            claim_token=secrets.token_urlsafe(32),
            deadline_seconds=self._deadline(),
            started=time.monotonic(),
            exited=loop.create_future(),
            claimed=loop.create_future(),
            assignment=loop.create_future(),
            result=loop.create_future(),
        )
        self._sandboxes[sandbox.id] = sandbox
        self._claims[sandbox.claim_token] = sandbox
        job: Any = self.job(sandbox)  # the client takes a plain mapping as well as a V1Job
        creating = asyncio.ensure_future(
            asyncio.to_thread(self._batch.create_namespaced_job, self.options.namespace, job)
        )
        try:
            await asyncio.shield(creating)
        except ApiException as error:
            self._forget(sandbox)
            raise SandboxError(
                describe_api_error(error, f"create jobs in {self.options.namespace}")
            ) from None
        except BaseException:
            # Cancelled (e.g. the pool closing) while the API call is under way in its thread: the
            # Job may yet be created, so its deletion waits for the call's answer (a deletion sent
            # first finds nothing, and the Job would stay until its deadline).
            self._dispose(sandbox, after=creating)
            raise
        waiting: list[asyncio.Future[Any]] = [sandbox.claimed, sandbox.exited]
        try:
            done, _ = await asyncio.wait(
                waiting,
                timeout=self.options.spawn_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except BaseException:
            # Cancelled while the pod starts (the caller gone): its Job goes too, not at its deadline.
            self._dispose(sandbox)
            raise
        if sandbox.claimed in done:
            return sandbox
        self._dispose(sandbox)
        if sandbox.exited in done:
            raise SandboxError(
                f"sandbox pod {sandbox.job_name} ended before its runner claimed a run: {sandbox.exited.result()}"
            )
        why = f": {sandbox.problem}" if sandbox.problem else ""
        raise SandboxError(
            f"sandbox pod {sandbox.job_name} did not start within {self.options.spawn_timeout:g} s{why}"
        )

    async def _execute(self, sandbox: PodSandbox, spec: RunSpec) -> RunResult:
        limits = spec.limits
        report_token = secrets.token_urlsafe(32)
        self._reports[report_token] = sandbox
        started = time.monotonic()
        try:
            if sandbox.assignment.done():
                raise SandboxError(f"sandbox pod {sandbox.job_name} was retired before the run")
            sandbox.assignment.set_result((spec, report_token))
            ending: list[asyncio.Future[Any]] = [sandbox.result, sandbox.exited]
            done, _ = await asyncio.wait(
                ending,
                timeout=limits.timeout_seconds + REPORT_GRACE_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._reports.pop(report_token, None)
        if sandbox.result in done:
            report = sandbox.result.result()
            cap = limits.output_bytes
            return result_of(
                limits,
                stdout=report.stdout[:cap],
                stderr=report.stderr[:cap],
                exit_code=report.exit_code,
                duration_seconds=report.duration_seconds,
                timed_out=report.timed_out,
                overflowed=report.overflowed or len(report.stdout) > cap or len(report.stderr) > cap,
            )
        elapsed = time.monotonic() - started
        if sandbox.exited in done:
            end = sandbox.exited.result()
            if end.out_of_memory:
                return result_of(
                    limits, stdout=b"", stderr=b"", exit_code=137, duration_seconds=elapsed, timed_out=False,
                    overflowed=False, memory_note=f"memory limit of {describe_bytes(limits.memory_bytes)} exceeded",
                )  # fmt: skip
            if end.evicted or end.reason == "DeadlineExceeded":
                return RunResult(
                    stdout="",
                    stderr=f"[sandbox] the sandbox pod was stopped by Kubernetes ({end}); the run did not finish\n",
                    exit_code=137,
                    duration_ms=round(elapsed * 1000),
                    timed_out=end.reason == "DeadlineExceeded",
                    truncated=False,
                )
            raise SandboxError(f"sandbox pod {sandbox.job_name} ended without a result: {end}")
        # The runner stops the program at its timeout and reports; this is the backstop when it cannot.
        log.warning("sandbox pod %s did not report within its timeout: deleted", sandbox.job_name)
        return result_of(
            limits,
            stdout=b"",
            stderr=b"",
            exit_code=137,
            duration_seconds=elapsed,
            timed_out=True,
            overflowed=False,
        )

    def _dispose(self, sandbox: PodSandbox, after: asyncio.Future[Any] | None = None) -> None:
        """Forget the sandbox and delete its Job (and with it its pod), in the background; once
        `after` (the call creating the Job) has its answer, when given."""
        if sandbox.disposed:
            return
        sandbox.disposed = True
        if not sandbox.assignment.done():
            sandbox.assignment.cancel()  # a runner waiting in Claim is retired
        self._claims.pop(sandbox.claim_token, None)
        task = asyncio.get_running_loop().create_task(self._delete_job(sandbox, after))
        self._deletions.add(task)
        task.add_done_callback(self._deletions.discard)

    async def _delete_job(self, sandbox: PodSandbox, after: asyncio.Future[Any] | None = None) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])
                if not after.cancelled():
                    after.exception()  # seen: a creation that failed left nothing to delete but a 404
            await asyncio.to_thread(
                self._batch.delete_namespaced_job,
                sandbox.job_name,
                self.options.namespace,
                propagation_policy="Background",
                grace_period_seconds=0,
            )
        except ApiException as error:
            if error.status != 404:
                log.warning("%s", describe_api_error(error, f"delete job {sandbox.job_name}"))
        except Exception as error:  # noqa: BLE001 - the API unreachable: the Job's TTL and deadline remain
            log.warning("cannot delete job %s: %s", sandbox.job_name, error)
        finally:
            self._forget(sandbox)

    def _forget(self, sandbox: PodSandbox) -> None:
        sandbox.disposed = True
        self._sandboxes.pop(sandbox.id, None)
        self._claims.pop(sandbox.claim_token, None)
        self._end(sandbox, PodEnd("Deleted", "the executor deleted it"))

    def _end(self, sandbox: PodSandbox, end: PodEnd) -> None:
        if not sandbox.exited.done():
            sandbox.exited.set_result(end)

    # -- the objects ----------------------------------------------------------------------------

    def _deadline(self) -> int:
        """A pod's life (its Job's activeDeadlineSeconds and its own): the template's, raised where
        needed to fit a start and the longest run. A warm pod retires while it still has the time
        for the longest run, so the template's value sets how long pods wait warm."""
        needed = math.ceil(
            self.options.spawn_timeout + self.options.max_timeout_seconds + REPORT_GRACE_SECONDS
        )
        ceiling = self._template.get("spec", {}).get("activeDeadlineSeconds")
        return max(int(ceiling), needed) if ceiling else needed

    def job(self, sandbox: PodSandbox) -> dict[str, Any]:
        """The Job of one sandbox: the pod template with this replica's labels, the runner's
        address and claim token, resources from the limits profile, the package environment's
        read-only volume if the profile has one; nothing of any run."""
        profile = sandbox.profile.limits
        template = copy.deepcopy(self._template)
        labels = {
            **template.get("metadata", {}).get("labels", {}),
            EXECUTOR_LABEL: self.executor_id,
            SANDBOX_LABEL: sandbox.id,
        }
        template.setdefault("metadata", {})["labels"] = labels
        spec = template["spec"]
        spec["activeDeadlineSeconds"] = sandbox.deadline_seconds
        runner = next(c for c in spec["containers"] if c["name"] == RUNNER_CONTAINER)
        env = [e for e in runner.get("env", []) if e["name"] not in (ADDRESS_VARIABLE, CLAIM_TOKEN_VARIABLE)]
        runner["env"] = [
            {"name": ADDRESS_VARIABLE, "value": self._callback_address},
            {"name": CLAIM_TOKEN_VARIABLE, "value": sandbox.claim_token},
            *env,
        ]
        # /tmp and the working directory are memory volumes: they count against the same limit.
        memory = profile.memory_bytes + 2 * profile.tmp_bytes + RUNNER_MEMORY_BYTES
        cpu = f"{max(round(profile.cpus * 1000), 10)}m"
        resources = runner.setdefault("resources", {})
        resources.setdefault("limits", {}).update(memory=str(memory), cpu=cpu)
        requests = resources.setdefault("requests", {})
        requests["memory"] = str(memory)
        for volume in spec.get("volumes", []):
            if volume["name"] in ("tmp", "workspace") and "emptyDir" in volume:
                volume["emptyDir"]["sizeLimit"] = str(profile.tmp_bytes)
        environment = sandbox.profile.environment
        if environment is not None:
            # Read-only twice over: the claim's volume and the mount; subPath shows this one
            # environment and nothing else of the store (other users' environments included).
            spec.setdefault("volumes", []).append(
                {
                    "name": PACKAGES_VOLUME,
                    "persistentVolumeClaim": {"claimName": self.options.packages_claim, "readOnly": True},
                }
            )
            runner.setdefault("volumeMounts", []).append(
                {
                    "name": PACKAGES_VOLUME,
                    "mountPath": SANDBOX_MOUNT,
                    "subPath": environment,
                    "readOnly": True,
                }
            )
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": sandbox.job_name,
                "namespace": self.options.namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "pyth-on",
                    "app.kubernetes.io/component": "sandbox",
                    EXECUTOR_LABEL: self.executor_id,
                    SANDBOX_LABEL: sandbox.id,
                },
            },
            "spec": {
                "backoffLimit": 0,
                "ttlSecondsAfterFinished": self.options.job_ttl_seconds,
                "activeDeadlineSeconds": sandbox.deadline_seconds,
                "template": template,
            },
        }

    # -- the API --------------------------------------------------------------------------------

    async def _read_template(self) -> dict[str, Any]:
        name, namespace = self.options.pod_template, self.options.namespace
        try:
            found = await asyncio.to_thread(self._core.read_namespaced_pod_template, name, namespace)
        except ApiException as error:
            raise SandboxUnavailable(
                describe_api_error(error, f"get podtemplate {namespace}/{name}")
            ) from None
        except Exception as error:  # noqa: BLE001 - unreachable, TLS, DNS: said as such
            raise SandboxUnavailable(f"cannot reach the Kubernetes API: {error}") from None
        template: dict[str, Any] = self._api.sanitize_for_serialization(found.template) or {}
        containers = template.get("spec", {}).get("containers", [])
        if not any(container.get("name") == RUNNER_CONTAINER for container in containers):
            raise SandboxUnavailable(
                f"podtemplate {namespace}/{name} has no container named {RUNNER_CONTAINER!r}"
            )
        return template

    async def reap(self) -> int:
        """Delete the Jobs and pods that carry this replica's id (what a predecessor of the same id,
        e.g. before a restart of its container, left); how many objects were deleted."""
        selector = f"{EXECUTOR_LABEL}={self.executor_id}"
        namespace = self.options.namespace
        try:
            jobs = await asyncio.to_thread(
                self._batch.list_namespaced_job, namespace, label_selector=selector
            )
            pods = await asyncio.to_thread(self._core.list_namespaced_pod, namespace, label_selector=selector)
        except ApiException as error:
            raise SandboxUnavailable(
                describe_api_error(error, f"list jobs and pods in {namespace}")
            ) from None
        deleted = 0
        for kind, items, delete in (
            ("job", jobs.items, self._batch.delete_namespaced_job),
            ("pod", pods.items, self._core.delete_namespaced_pod),
        ):
            for item in items:
                name = item.metadata.name if item.metadata else None
                labels = (item.metadata.labels if item.metadata else None) or {}
                if name is None or labels.get(SANDBOX_LABEL, "") in self._sandboxes:
                    continue  # our own, alive
                try:
                    await asyncio.to_thread(
                        delete, name, namespace, propagation_policy="Background", grace_period_seconds=0
                    )
                    deleted += 1
                except ApiException as error:
                    if error.status != 404:
                        raise SandboxUnavailable(describe_api_error(error, f"delete {kind} {name}")) from None
        if deleted:
            log.info("reaped %d sandbox objects a predecessor (executor %s) left", deleted, self.executor_id)
        return deleted

    async def _pod_address(self, sandbox: PodSandbox) -> str | None:
        """The pod's IP address: from the watch, or from the API if the watch has not told yet."""
        if sandbox.pod_ip is None:
            try:
                await asyncio.wait_for(sandbox.address_known.wait(), POD_ADDRESS_WAIT_SECONDS)
            except TimeoutError:
                pods = await asyncio.to_thread(
                    self._core.list_namespaced_pod,
                    self.options.namespace,
                    label_selector=f"{SANDBOX_LABEL}={sandbox.id},{EXECUTOR_LABEL}={self.executor_id}",
                )
                for pod in pods.items:
                    if pod.status and pod.status.pod_ip:
                        sandbox.pod_ip = normal_address(pod.status.pod_ip)
        return sandbox.pod_ip

    def _watch_pods(self) -> None:
        """(A thread.) Follow this replica's pods and hand each change to the event loop."""
        selector = f"{EXECUTOR_LABEL}={self.executor_id}"
        resource_version: str | None = None
        delay = 0.5
        loop = self._loop
        assert loop is not None  # noqa: S101 - set by start before the thread exists
        while self._watching.is_set():
            stream = watch.Watch()
            try:
                kwargs: dict[str, Any] = {"label_selector": selector, "timeout_seconds": WATCH_SECONDS}
                if resource_version:
                    kwargs["resource_version"] = resource_version
                for event in stream.stream(self._core.list_namespaced_pod, self.options.namespace, **kwargs):
                    if not self._watching.is_set():
                        stream.stop()
                        break
                    pod = event["raw_object"]  # the JSON as sent (the client also builds a V1Pod)
                    resource_version = pod.get("metadata", {}).get("resourceVersion") or resource_version
                    loop.call_soon_threadsafe(self._on_pod_event, event["type"], pod)
                delay = 0.5
                continue  # the server ended the watch (its timeout): watch on from where it was
            except ApiException as error:
                if error.status == 410:  # too old: start again from now
                    resource_version = None
                    continue
                if self._watching.is_set():
                    log.warning("%s", describe_api_error(error, "watch pods"))
            except Exception as error:  # noqa: BLE001 - connection trouble: watch again after a pause
                if self._watching.is_set():
                    log.warning("the watch of sandbox pods broke (%s); watching again", error)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_pod_event(self, kind: str, pod: Mapping[str, Any]) -> None:
        labels = pod.get("metadata", {}).get("labels", {})
        sandbox = self._sandboxes.get(labels.get(SANDBOX_LABEL, ""))
        if sandbox is None:
            return
        sandbox.pod_name = pod.get("metadata", {}).get("name", sandbox.pod_name)
        status = pod.get("status", {})
        if status.get("podIP") and sandbox.pod_ip is None:
            sandbox.pod_ip = normal_address(status["podIP"])
            sandbox.address_known.set()
        if kind == "DELETED":
            self._end(sandbox, PodEnd("Deleted", "the pod was deleted"))
            return
        end = pod_end(status)
        if end is not None:
            self._end(sandbox, end)
        else:
            sandbox.problem = pod_problem(status) or sandbox.problem

    async def _smoke_test(self) -> None:
        async def check(language: str) -> str | None:
            try:
                result = await self.run(RunSpec(language, LANGUAGES[language].smoke_test))
            except SandboxError as error:
                return str(error)
            if result.stdout != SMOKE_TEST_OUTPUT:
                return result.stderr.strip() or f"exit status {result.exit_code}"
            return None

        failures = dict(
            zip(
                self._languages, await asyncio.gather(*(check(name) for name in self._languages)), strict=True
            )
        )
        for language, reason in failures.items():
            if reason is not None:
                log.warning("kubernetes sandbox for %s cannot run: %s", language, reason)
                self.unavailable[language] = reason
                self._languages.remove(language)
        if not self._languages:
            await self.close()
            raise SandboxUnavailable(
                "no sandbox pod ran its smoke test: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
            )

    def _listen_address(self) -> str:
        if self.options.listen_address:
            return self.options.listen_address
        return f"[::]:{self._callback_address.rpartition(':')[2]}"


def pod_end(status: Mapping[str, Any]) -> PodEnd | None:
    """How the pod ended, or None while it has not."""
    for container in status.get("containerStatuses", []) or []:
        if container.get("name") != RUNNER_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return PodEnd(terminated.get("reason") or "Terminated", terminated.get("message") or
                          f"exit status {terminated.get('exitCode')}")  # fmt: skip
    if status.get("phase") in ("Failed", "Succeeded"):
        return PodEnd(status.get("reason") or status["phase"], status.get("message") or "")
    return None


_START_PROBLEMS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)


def pod_problem(status: Mapping[str, Any]) -> str | None:
    """Why a pod is not running yet, in the API's words (for the error when it never does)."""
    for condition in status.get("conditions", []) or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"not scheduled ({condition.get('reason')}): {condition.get('message', '')}"
    for container in status.get("containerStatuses", []) or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _START_PROBLEMS:
            return f"{waiting['reason']}: {waiting.get('message', '')}"
    return None


def normal_address(address: str) -> str:
    """An IP address in one spelling (IPv4-mapped IPv6 as IPv4)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_address(peer: str) -> str | None:
    """The caller's IP address from gRPC's peer string ("ipv4:10.0.0.5:4242", "ipv6:[::1]:4242")."""
    family, _, rest = urllib.parse.unquote(peer).partition(":")
    if family not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return normal_address(host)
    except ValueError:
        return None


def _image_provides(host: str, inside: str) -> bool:
    """The decryptor of encrypted runs and what it needs (its libraries, the recipe, the shared
    libraries they link) are installed in the sandbox image at the paths the host backends bind
    them to (containers/sandbox.Containerfile; tests/k8s checks the two agree), so those mounts are
    already in every pod."""
    from services.executor import encrypted_runs  # the executor's, which imports this package

    return (host, inside) in encrypted_runs.decryptor_binds()


def _label_safe(name: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:63].strip("-_.")
    return value or "executor"
