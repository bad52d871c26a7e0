"""Supervising a whole mesh on one machine: OpenBao, every built service and the Envoy edge as
separate processes on loopback ports of their own, started in order, watched, and stopped cleanly.

`pyth-on up` and the integration tests both start the mesh through `Mesh`."""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge import config as edge_config
from services.platform import service_graph
from services.platform.client import channel_credentials, tls_channel_options
from services.platform.service_graph import ServiceNode
from services.platform.settings import (
    MESH_CA_VARIABLE,
    MESH_CERT_VARIABLE,
    MESH_KEY_VARIABLE,
    Environment,
    MeshTls,
)
from services.runner import openbao
from services.runner.layout import MAX_SOCKET_PATH_BYTES, RUNNER_IDENTITY, DataLayout
from services.runner.migrate import migrate_all
from services.runner.settings_catalog import COMMON, catalog, service_prefix
from services.system import settings as system_settings

_log = logging.getLogger("pythonon.runner")

LOOPBACK = "127.0.0.1"
EDGE = "envoy"
EXECUTOR = "executor"
MAX_EXECUTORS = 16
OPENBAO = "openbao"
_DATABASE_SCHEMES = ("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")
# Variables every service may read from the runner's own environment (besides its own documented
# PYTHONON_* settings, see operator_settings); everything else is built fresh.
_PASSED_THROUGH_PREFIXES = ("OTEL_",)
# The runner turns it into each service's own database URL; a service never needs the shared one.
_RUNNER_ONLY = frozenset({"PYTHONON_DATABASE_URL"})


class MeshError(Exception):
    """The mesh could not start, or a part of it failed; the message says which and why."""


@dataclass(frozen=True)
class MeshPorts:
    """Where everything listens: the edge (public), each service's gRPC server (mutual TLS, see
    mesh_ca), and OpenBao's API. Envoy's admin has no port: it is a Unix socket of the data
    directory (DataLayout.envoy_admin_socket)."""

    edge: int
    services: Mapping[str, int]
    vault: int
    # Every replica's port of a service run several times (the first is services[name]).
    replicas: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def ports_of(self, service: str) -> tuple[int, ...]:
        return self.replicas.get(service) or (self.services[service],)


@dataclass(frozen=True)
class MeshPlan:
    """Everything a service's environment is computed from."""

    layout: DataLayout
    ports: MeshPorts
    database_urls: Mapping[str, str]  # service name → URL, for services that keep state

    def address(self, service: str) -> str:
        """host:port of the service, or of each of its replicas, comma-separated (callers balance)."""
        return ",".join(f"{LOOPBACK}:{port}" for port in self.ports.ports_of(service))

    @property
    def vault_address(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.vault}"

    @property
    def openbao(self) -> openbao.OpenBaoFiles:
        return openbao.OpenBaoFiles.at(self.layout.root)


# The services this runner starts: the built ones of the service graph. Their wiring (the
# addresses of the services each calls, its database URL, its outside variables) comes from the
# graph; what only this machine knows is added by the hooks below.
SERVICES: tuple[ServiceNode, ...] = service_graph.built_services()


def _auth_keys(plan: MeshPlan) -> dict[str, str]:
    """The keys the runner generated in the data directory."""
    keys = plan.layout
    return {
        "PYTHONON_AUTH_IDENTITY_KEY_FILE": str(keys.identity_key),
        "PYTHONON_AUTH_ACCESS_TOKEN_KEY_FILE": str(keys.access_token_key),
        "PYTHONON_AUTH_SECRET_KEY_FILE": str(keys.auth_secret_key),
    }


def _openbao_login(plan: MeshPlan) -> dict[str, str]:
    """The local OpenBao and the policy-limited token the runner issued (never the root token)."""
    return {
        "PYTHONON_SECRETS_VAULT_ADDR": plan.vault_address,
        "PYTHONON_SECRETS_VAULT_TOKEN_FILE": str(plan.openbao.service_token),
    }


def _system_view(plan: MeshPlan) -> dict[str, str]:
    """What the system service watches besides the services it calls (their addresses come from
    the graph): every database and the local OpenBao."""
    return {
        system_settings.DATABASE_URLS_VARIABLE: ",".join(
            dict.fromkeys(plan.database_urls[service.name] for service in SERVICES if service.database)
        ),
        system_settings.VAULT_ADDRESS_VARIABLE: plan.vault_address,
    }


def _packages_store(variable: str) -> Callable[[MeshPlan], dict[str, str]]:
    """The package environments' directory, built by the packages service and read by the executor."""
    return lambda plan: {variable: str(plan.layout.packages)}


def _secrets_side(plan: MeshPlan) -> dict[str, str]:
    return {**_openbao_login(plan), "PYTHONON_SECRETS_USER_MARKERS_DIR": str(plan.layout.secret_markers)}


def _executor_side(plan: MeshPlan) -> dict[str, str]:
    """The package store, and the secrets service's user markers (a user without secrets: no call)."""
    return {
        **_packages_store("PYTHONON_EXECUTOR_PACKAGES_DIR")(plan),
        "PYTHONON_EXECUTOR_SECRETS_MARKERS_DIR": str(plan.layout.secret_markers),
    }


# Settings of a service that depend on this machine rather than on the graph.
_LOCAL_SETTINGS: dict[str, Callable[[MeshPlan], dict[str, str]]] = {
    "auth": _auth_keys,
    "secrets": _secrets_side,
    "system": _system_view,
    "packages": _packages_store("PYTHONON_PACKAGES_DIR"),
    "executor": _executor_side,
}


def operator_settings(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """What each built service is given from the runner's own environment: its documented
    `PYTHONON_<SERVICE>_*` settings and the common ones (e.g. PYTHONON_SHUTDOWN_GRACE_SECONDS).

    Raises MeshError naming every variable that cannot be honoured: one the runner wires itself
    (an address, a port, a database URL, a key file: it would silently lose) and one that names a
    built service but is none of its settings (a typo would otherwise do nothing)."""
    tables = catalog()
    wired = {setting.name for table in tables.values() for setting in table if setting.wired}
    common = {setting.name for setting in tables[COMMON] if not setting.wired} - _RUNNER_ONLY
    given: dict[str, dict[str, str]] = {service: {} for service in tables if service != COMMON}
    problems = []
    for name, value in sorted(environ.items()):
        if not name.startswith("PYTHONON_") or name in _RUNNER_ONLY:
            continue
        if name in wired:
            problems.append(
                f"{name} is set by pyth-on up itself (from the data directory and the service graph)"
            )
        elif name in common:
            for settings in given.values():
                settings[name] = value
        else:
            owner = next((service for service in given if name.startswith(service_prefix(service))), None)
            if owner is None:
                continue  # not a service of this mesh (an unbuilt one, or a test's own variable)
            if name not in {setting.name for setting in tables[owner]}:
                problems.append(f"{name} is not a setting of the {owner} service")
            else:
                given[owner][name] = value
    if problems:
        unset = "unset it" if len(problems) == 1 else "unset them"
        raise MeshError(f"{'; '.join(problems)}: {unset} (every setting: docs/settings.md)")
    return given


@dataclass(frozen=True)
class Restart:
    """A part that ended and is being started again: `how` it ended ("was killed by signal 9",
    "exited with status 1"), the `attempt` within the restart window, and the back-off before it."""

    part: str
    how: str
    attempt: int
    limit: int
    delay_seconds: float

    def describe(self) -> str:
        return (
            f"{self.part} {self.how}; restarting it in {self.delay_seconds:g} s "
            f"(attempt {self.attempt} of {self.limit})"
        )


@dataclass(frozen=True)
class MeshConfig:
    """How to run a mesh.

    `port` is the edge's public port; 0 picks a free one. `service_env` overrides variables per
    service name (e.g. shorter rate limits in tests); `edge_options` are passed to
    `edge.config.render` (e.g. `max_request_bytes`, `access_log_path`)."""

    port: int = 8080
    data_dir: Path | str = ".data"
    database_url: str | None = None
    host: str = LOOPBACK
    log_level: str = "INFO"
    service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    edge_options: Mapping[str, Any] = field(default_factory=dict)
    startup_timeout_seconds: float = 60.0
    stop_grace_seconds: float = 10.0
    # Supervision once the mesh is up: a part that ends is started again after a back-off that
    # doubles from `restart_delay_seconds`; the `restart_limit + 1`-th end within the window is
    # final (`wait()` returns it; `pyth-on up` then stops everything). 0: no restarts at all.
    restart_limit: int = 5
    restart_window_seconds: float = 60.0
    restart_delay_seconds: float = 0.2
    # Executor processes behind the edge (each its own port, sandboxes and share of the host).
    executors: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise MeshError(f"--port must be 0-65535, got {self.port}")
        if not 1 <= self.executors <= MAX_EXECUTORS:
            raise MeshError(f"--executors must be 1-{MAX_EXECUTORS}, got {self.executors}")
        if self.restart_limit < 0 or self.restart_window_seconds <= 0 or self.restart_delay_seconds < 0:
            raise MeshError("restart_limit must be >= 0, the window > 0 and the delay >= 0")
        unknown = set(self.service_env) - {service.name for service in SERVICES}
        if unknown:
            raise MeshError(f"service_env names services that are not built: {sorted(unknown)}")
        # The URL is not echoed: it may carry a password.
        if self.database_url is not None and not self.database_url.startswith(_DATABASE_SCHEMES):
            raise MeshError("--database-url must be a sqlite:// or postgresql:// URL")

    def pick_ports(self) -> MeshPorts:
        """Check the edge port is free (or pick one when it is 0) and pick distinct free loopback
        ports for every service and OpenBao."""
        with ExitStack() as held:
            # All sockets stay bound until every port is chosen, so no two choices coincide.
            if self.port:
                held.enter_context(_bind(self.host, self.port))
                edge = self.port
            else:
                edge = _bound_port(held.enter_context(_bind(self.host, 0)))

            def free() -> int:
                return _bound_port(held.enter_context(_bind(LOOPBACK, 0)))

            replicas = {
                service.name: tuple(free() for _ in range(self.replicas_of(service.name)))
                for service in SERVICES
            }
            vault = free()
        return MeshPorts(
            edge=edge,
            services={name: ports[0] for name, ports in replicas.items()},
            vault=vault,
            replicas={name: ports for name, ports in replicas.items() if len(ports) > 1},
        )

    def replicas_of(self, service: str) -> int:
        return self.executors if service == EXECUTOR else 1


@contextmanager
def _bind(host: str, port: int) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As servers do, so a port left in TIME_WAIT by an earlier run does not read as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise MeshError(
                    f"port {port} on {host} is already in use; stop whatever listens there or choose "
                    "another with --port"
                ) from None
            raise MeshError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        yield sock
    finally:
        sock.close()


def _bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# util-linux's setpriv starts each child with PR_SET_PDEATHSIG: SIGTERM when the runner dies, even
# by SIGKILL, so a killed runner leaves no orphaned mesh behind. (Not a preexec_fn: that would make
# subprocess fork() a process whose gRPC threads are running, which gRPC answers with an abort.)
_SETPRIV = shutil.which("setpriv")


def _dies_with_parent(argv: list[str]) -> list[str]:
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv] if _SETPRIV else argv


class _Child:
    """A supervised process, leader of its own process group, logging to a file."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path, why: str = ""
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.env = dict(env)
        # Logs may name users and paths: private like the rest of the data directory.
        with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.write(f"--- pyth-on: starting {name} at {stamp}{why} ---\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.process = subprocess.Popen(
                _dies_with_parent(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: the terminal's Ctrl-C reaches only the runner, which then stops
                # everything in order, and a stop reaches whatever the child itself started.
                start_new_session=True,
                # Databases and anything else a child creates are readable by the owner only.
                umask=0o077,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """The exit status if the process has ended, else None. The zombie is left unreaped so its
        pid, and so its process group id, cannot be reused before `stop` signals the group."""
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.process.poll()
        if result is None:
            return None
        return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def reap(self) -> int:
        # Sweep the group before the leader's pid is released (see exit_code).
        self.signal_group(signal.SIGKILL)
        return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines this run of the process wrote."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        tail = text.rstrip("\n").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) if tail else "    (nothing logged)"

    def describe_exit(self, code: int, note: str = "") -> str:
        return f"{self.name} {how_it_ended(code)}{note}; last lines of {self.log_path}:\n{self.log_tail()}"


def how_it_ended(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


@dataclass(frozen=True)
class _PartSpec:
    """How a part was started, so a restart is the same process: same command, environment, port."""

    argv: list[str]
    env: Mapping[str, str]


class _Stopping(Exception):
    """The mesh is being stopped while a restart waits."""


class Mesh:
    """A running mesh. `start()` starts OpenBao first and returns once the edge answers 200 on
    /health; from then on a supervisor thread restarts any part that ends (see MeshConfig's
    restart_* fields; OpenBao is unsealed again, every part gets the command, environment and port
    it had). `stop()` stops Envoy first, then the services, then OpenBao (SIGTERM, then SIGKILL
    after the grace period). Usable as a context manager. The data directory is locked while the
    mesh runs, so two meshes never share one.

    `on_restart` is called (on the supervisor thread) for every restart; by default it is logged."""

    def __init__(self, config: MeshConfig, on_restart: Callable[[Restart], None] | None = None) -> None:
        self.config = config
        self.layout = DataLayout.at(config.data_dir)
        self._ports: MeshPorts | None = None
        self._runner_tls: MeshTls | None = None
        self._plan: MeshPlan | None = None
        self._children: dict[str, _Child] = {}
        self._specs: dict[str, _PartSpec] = {}
        self._lock: Any = None
        self._on_restart = on_restart or (lambda restart: _log.warning("%s", restart.describe()))
        self.restarts: list[Restart] = []  # every restart so far, in order
        self._ended_at: dict[str, deque[float]] = {}
        self._failure: tuple[str, str] | None = None
        self._children_lock = threading.Lock()
        self._stopping = threading.Event()
        # Set by stop() once every process is gone: the supervisor thread lives until then, because
        # each process it restarted gets its PR_SET_PDEATHSIG when the thread that started it ends.
        self._released = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._supervisor_parked = threading.Event()  # it no longer touches the children

    # -- what tests and the CLI read --------------------------------------------------------------

    @property
    def ports(self) -> MeshPorts:
        if self._ports is None:
            raise MeshError("the mesh has not been started")
        return self._ports

    @property
    def url(self) -> str:
        """The edge's base URL, e.g. http://127.0.0.1:8080."""
        return f"http://{_url_host(self.config.host)}:{self.ports.edge}"

    @property
    def identity_key_path(self) -> Path:
        """The private key that signs identity assertions (tests use it to forge valid ones)."""
        return self.layout.identity_key

    @property
    def identity_public_key_path(self) -> Path:
        return self.layout.identity_public_key

    def service_address(self, name: str) -> str:
        """host:port of a service's gRPC server (bypassing the edge; it requires a mesh certificate,
        see member_tls)."""
        return f"{LOOPBACK}:{self.ports.services[name]}"

    def member_tls(self, identity: str = RUNNER_IDENTITY) -> MeshTls:
        """The mesh identity of a member (a service's name, "edge" or "runner"): what a direct call
        to a service's port must present (tests use it; an outside process has none of these)."""
        return MeshTls.load(Environment(_mesh_identity(self.layout, identity)))

    @property
    def envoy_admin_socket(self) -> Path:
        """Envoy's admin interface (a Unix socket; it has no TCP port)."""
        return self.layout.envoy_admin_socket

    def database_url(self, service: str) -> str:
        """The database URL the service was given."""
        return self.config.database_url or self.layout.sqlite_url(service)

    def log_path(self, name: str) -> Path:
        """logs/<name>.log for a service name, "envoy" or "openbao"."""
        return self.layout.log(name)

    @property
    def vault_address(self) -> str:
        """OpenBao's API, e.g. http://127.0.0.1:8200 (loopback only)."""
        return f"http://{LOOPBACK}:{self.ports.vault}"

    @property
    def openbao_files(self) -> openbao.OpenBaoFiles:
        """OpenBao's storage, config, init record (unseal key, root token) and the service's token."""
        return openbao.OpenBaoFiles.at(self.layout.root)

    @property
    def pids(self) -> dict[str, int]:
        """Process id of every process running now (each also leads its own process group); a
        restarted part has a new one."""
        with self._children_lock:
            return {name: child.pid for name, child in self._children.items()}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Mesh:
        """Start OpenBao and bring it to service, start every service, wait for their gRPC health,
        then start Envoy and wait for /health.

        Raises MeshError, naming the process that failed with the tail of its log; whatever was
        started is stopped again before it raises."""
        if self._children:
            raise MeshError("the mesh is already running")
        given = operator_settings(os.environ)  # before anything starts: a refused variable starts nothing
        admin_socket = bytes(self.layout.envoy_admin_socket)
        if len(admin_socket) > MAX_SOCKET_PATH_BYTES:
            raise MeshError(
                f"the data directory's path is too long for Envoy's admin socket {admin_socket.decode()} "
                f"({len(admin_socket)} bytes, at most {MAX_SOCKET_PATH_BYTES}); choose a shorter --data-dir"
            )
        try:
            self._take_lock()
            self.layout.prepare()
            self._runner_tls = self.member_tls(RUNNER_IDENTITY)
            self._ports = self.config.pick_ports()
            plan = MeshPlan(
                layout=self.layout,
                ports=self._ports,
                database_urls={
                    service.name: self.database_url(service.name) for service in SERVICES if service.database
                },
            )
            self._plan = plan
            atexit.register(self.stop)
            migrate_all(plan.database_urls)  # once, before any service starts (services only check)
            deadline = time.monotonic() + self.config.startup_timeout_seconds
            self._start_openbao(plan, deadline)
            for service in SERVICES:
                env = self._service_env(service, plan, given.get(service.name, {}))
                for name, port in replica_names(service.name, plan.ports.ports_of(service.name)):
                    self._spawn(
                        name,
                        [sys.executable, "-m", f"services.{service.name}"],
                        {**env, "PYTHONON_PORT": str(port)},
                    )
            for service in SERVICES:
                for name, port in replica_names(service.name, plan.ports.ports_of(service.name)):
                    self._wait_serving(name, f"{LOOPBACK}:{port}", deadline, service.name)
            self._start_edge(plan)
            self._wait_edge(deadline)
            self.restarts.clear()
            self._ended_at.clear()
            self._failure = None
            self._stopping.clear()
            self._released.clear()
            self._supervisor_parked = threading.Event()
            self._supervisor = threading.Thread(
                target=self._supervise, name="pyth-on supervisor", daemon=True
            )
            self._supervisor.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Envoy, then the services, then OpenBao; idempotent. Removes nothing from the data
        directory."""
        atexit.unregister(self.stop)
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            # Wait until it no longer touches the children (a restart under way gives up at once).
            while supervisor.is_alive() and not self._supervisor_parked.wait(0.05):
                pass
        edge = self._children.pop(EDGE, None)
        if edge is not None:
            self._terminate([edge])
        vault = self._children.pop(OPENBAO, None)
        services = list(self._children.values())
        self._children.clear()
        self._terminate(services)
        for child in services:
            if child.name == EXECUTOR or child.name.startswith(f"{EXECUTOR}-"):
                _reap_sandboxes(child)
        if vault is not None:
            self._terminate([vault])
        self._specs.clear()
        self._released.set()
        if supervisor is not None:
            supervisor.join()
        self._release_lock()

    def exited(self) -> tuple[str, str] | None:
        """(name, description) of the part the supervisor gave up on (it ended more often than
        `restart_limit` allows within the window), else None."""
        return self._failure

    def wait(self, timeout: float | None = None) -> tuple[str, str] | None:
        """Block until a process ends (returns `exited()`) or `timeout` seconds pass (None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended = self.exited()
            if ended is not None or (deadline is not None and time.monotonic() >= deadline):
                return ended
            time.sleep(0.2)

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self.layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = open(self.layout.lock_file, "a+")  # noqa: SIM115 (held for the mesh's lifetime)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise MeshError(
                f"the data directory {self.layout.root} is in use by another pyth-on (pid {holder}); "
                "stop it or choose another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _base_env(self) -> dict[str, str]:
        """A clean environment: nothing of the runner's leaks into a service unless listed."""
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
            "HOME": str(self.layout.root),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        env.update({k: v for k, v in os.environ.items() if k.startswith(_PASSED_THROUGH_PREFIXES)})
        return env

    def _service_env(
        self, service: ServiceNode, plan: MeshPlan, given: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Its environment: the operator's settings for it (`given`, see operator_settings), then
        the wiring, which always wins, then the config's overrides."""
        env = self._base_env()
        env.update({name: os.environ[name] for name in service.outside_variables if name in os.environ})
        env.update(given or {})
        env.update(
            {
                "PYTHONON_HOST": LOOPBACK,
                "PYTHONON_PORT": str(plan.ports.services[service.name]),
                "PYTHONON_LOG_LEVEL": self.config.log_level,
                "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(self.layout.identity_public_key),
                **_mesh_identity(self.layout, service.name),
            }
        )
        env.update(
            service_graph.wiring_environment(service.name, plan.address, plan.database_urls.get(service.name))
        )
        if service.name in _LOCAL_SETTINGS:
            env.update(_LOCAL_SETTINGS[service.name](plan))
        if service.name == EXECUTOR and self.config.executors > 1:
            env["PYTHONON_EXECUTOR_REPLICAS_ON_HOST"] = str(self.config.executors)
        env.update(self.config.service_env.get(service.name, {}))
        return env

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str], why: str = "") -> None:
        child = _Child(name, argv, env, self.layout.log(name), cwd=self.layout.root, why=why)
        with self._children_lock:
            self._children[name] = child
        self._specs[name] = _PartSpec(list(argv), dict(env))

    # -- supervision (on its own thread, from the end of start() to stop()) -----------------------

    def _supervise(self) -> None:
        try:
            while not self._stopping.wait(0.1) and self._failure is None:
                with self._children_lock:
                    ended = [(name, child, child.exit_code()) for name, child in self._children.items()]
                for name, child, code in ended:
                    if code is not None and not self._stopping.is_set():
                        self._restart(name, child, code)
        except _Stopping:
            pass
        except Exception as error:  # noqa: BLE001 (a bug here must not leave the mesh silently unsupervised)
            _log.exception("the supervisor failed")
            self._failure = ("supervisor", f"the runner's supervisor failed: {type(error).__name__}: {error}")
        finally:
            self._supervisor_parked.set()
            # Processes it restarted die with this thread (PR_SET_PDEATHSIG): outlive them.
            self._released.wait()

    def _restart(self, name: str, child: _Child, code: int) -> None:
        config = self.config
        now = time.monotonic()
        ended = self._ended_at.setdefault(name, deque())
        while ended and now - ended[0] > config.restart_window_seconds:
            ended.popleft()
        ended.append(now)
        attempt = len(ended)
        if attempt > config.restart_limit:
            note = (
                f" (it ended {attempt} times within {config.restart_window_seconds:g} s; not restarted again)"
                if config.restart_limit
                else ""
            )
            self._failure = (name, child.describe_exit(code, note))
            return
        restart = Restart(
            part=name,
            how=how_it_ended(code),
            attempt=attempt,
            limit=config.restart_limit,
            delay_seconds=config.restart_delay_seconds * 2 ** (attempt - 1),
        )
        self.restarts.append(restart)
        self._on_restart(restart)
        child.reap()  # and whatever it had started, still in its process group
        if self._stopping.wait(restart.delay_seconds):
            raise _Stopping
        spec = self._specs[name]
        self._spawn(name, spec.argv, spec.env, why=f" (restart {attempt}: it {restart.how})")
        if name == OPENBAO:
            self._unseal_restarted_openbao()

    def _unseal_restarted_openbao(self) -> None:
        """OpenBao starts sealed. A failure to unseal counts as another end: the process is killed
        and the next round of the supervisor restarts it again."""
        assert self._plan is not None

        def check_alive() -> None:
            if self._stopping.is_set():
                raise _Stopping
            self._fail_if_exited(OPENBAO)

        try:
            openbao.unseal(
                self._plan.vault_address,
                self._plan.openbao,
                deadline=time.monotonic() + self.config.startup_timeout_seconds,
                check_alive=check_alive,
            )
        except (openbao.OpenBaoError, MeshError) as error:
            _log.warning("OpenBao did not come back: %s", error)
            self._children[OPENBAO].signal_group(signal.SIGKILL)

    def _fail_if_exited(self, name: str) -> None:
        code = self._children[name].exit_code()
        if code is not None:
            raise MeshError(self._children[name].describe_exit(code))

    def _timed_out(self, name: str, what: str) -> MeshError:
        child = self._children[name]
        return MeshError(
            f"{name} {what} within {self.config.startup_timeout_seconds:g} s; "
            f"last lines of {child.log_path}:\n{child.log_tail()}"
        )

    def _wait_serving(self, name: str, address: str, deadline: float, service: str) -> None:
        while True:
            self._fail_if_exited(name)
            assert self._runner_tls is not None  # set by start() before any service starts
            if _grpc_serving(address, service, self._runner_tls):
                return
            if time.monotonic() >= deadline:
                raise self._timed_out(name, f"did not report SERVING on {address}")
            time.sleep(0.2)

    def _start_openbao(self, plan: MeshPlan, deadline: float) -> None:
        """Start OpenBao (a single-machine convenience, see services/runner/openbao.py), then
        initialise it on first start, unseal it, and issue the secrets service its token."""
        try:
            openbao.write_config(plan.openbao, plan.ports.vault)
            self._spawn(OPENBAO, openbao.server_argv(plan.openbao), self._base_env())
            openbao.prepare(
                plan.vault_address,
                plan.openbao,
                deadline=deadline,
                check_alive=lambda: self._fail_if_exited(OPENBAO),
            )
        except openbao.OpenBaoError as error:
            tail = self._children[OPENBAO].log_tail() if OPENBAO in self._children else "    (not started)"
            raise MeshError(f"{error}; last lines of {self.layout.log(OPENBAO)}:\n{tail}") from None

    def _start_edge(self, plan: MeshPlan) -> None:
        edge_config.write_config(
            self.layout.envoy_config,
            **{
                "listen_port": plan.ports.edge,
                "admin_socket": self.layout.envoy_admin_socket,
                "upstreams": {name: plan.address(name) for name in service_graph.edge_calls()},
                "upstream_tls": edge_config.UpstreamTls(
                    ca_file=self.layout.mesh_ca_certificate,
                    certificate_file=self.layout.mesh_certificate(service_graph.EDGE),
                    key_file=self.layout.mesh_key(service_graph.EDGE),
                ),
                "host": self.config.host,
                **self.config.edge_options,
            },
        )
        argv = [
            edge_config.envoy_binary(),
            "-c", str(self.layout.envoy_config),
            "--log-level", "warn",
            # No shared-memory hot-restart state, so two meshes can run side by side.
            "--disable-hot-restart",
        ]  # fmt: skip
        self._spawn(EDGE, argv, self._base_env())

    def _wait_edge(self, deadline: float) -> None:
        health = f"{self.url}/health"
        last = "no answer"
        while True:
            for name in list(self._children):
                self._fail_if_exited(name)
            status, body = _http_get(health)
            if status == 200:
                return
            if status is not None:
                last = f"HTTP {status} {body[:300]}"
            if time.monotonic() >= deadline:
                raise self._timed_out(EDGE, f"did not answer 200 on {health} (last: {last})")
            time.sleep(0.2)

    def _terminate(self, children: list[_Child]) -> None:
        for child in children:
            if child.exit_code() is None:
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_grace_seconds
        for child in children:
            while child.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            child.reap()


def replica_names(service: str, ports: tuple[int, ...]) -> list[tuple[str, int]]:
    """(process name, port) of each replica: the service's name for the first, then name-2, ...
    (the names of their log files and of Mesh.pids)."""
    return [(service if number == 1 else f"{service}-{number}", port) for number, port in enumerate(ports, 1)]


def _reap_sandboxes(executor: _Child) -> None:
    """What a stopped executor's sandboxes left (an executor killed after its grace period cannot
    close its backend): every owner of it is gone now, so its leftovers are reaped here rather than
    by a successor that may never start. Best effort: a stop must not fail on it."""
    from services.executor.sandbox import reap_leftovers

    try:
        options = json.loads(executor.env.get("PYTHONON_EXECUTOR_BACKEND_OPTIONS") or "{}")
        reaped = reap_leftovers(executor.env.get("PYTHONON_EXECUTOR_BACKEND") or "bwrap", options)
    except Exception:  # noqa: BLE001 - reported, never raised out of a stop
        _log.warning("could not reap the executor's leftover sandboxes", exc_info=True)
        return
    if reaped:
        _log.warning("reaped the stopped executor's leftovers: %s", reaped.describe())


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _mesh_identity(layout: DataLayout, identity: str) -> dict[str, str]:
    """The PYTHONON_MESH_* variables of a member: the CA, its certificate and key (see mesh_ca)."""
    return {
        MESH_CA_VARIABLE: str(layout.mesh_ca_certificate),
        MESH_CERT_VARIABLE: str(layout.mesh_certificate(identity)),
        MESH_KEY_VARIABLE: str(layout.mesh_key(identity)),
    }


def _grpc_serving(address: str, service: str, tls: MeshTls, timeout: float = 1.0) -> bool:
    with grpc.secure_channel(
        address, channel_credentials(tls), options=tls_channel_options(service)
    ) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


# The edge is local: a proxy from the runner's environment must not stand in between.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(status, body) of a GET, or (None, reason) when nothing answered."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as error:
        return None, str(error)
