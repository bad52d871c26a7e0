"""Supervising a whole mesh on one machine: OpenBao, every built service and the Envoy edge as
separate processes on loopback ports of their own, started in order, watched, and stopped cleanly.

`pyth-on up` and the integration tests both start the mesh through `Mesh`."""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
from services.platform.service_graph import ServiceNode
from services.runner import openbao
from services.runner.layout import DataLayout
from services.runner.migrate import migrate_all
from services.system import settings as system_settings

LOOPBACK = "127.0.0.1"
EDGE = "envoy"
OPENBAO = "openbao"
_DATABASE_SCHEMES = ("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")
# Variables a service may read from the runner's own environment; everything else is built fresh.
_PASSED_THROUGH_PREFIXES = ("OTEL_",)


class MeshError(Exception):
    """The mesh could not start, or a part of it failed; the message says which and why."""


@dataclass(frozen=True)
class MeshPorts:
    """Where everything listens: the edge (public), Envoy's admin, each service's gRPC server, and
    OpenBao's API."""

    edge: int
    admin: int
    services: Mapping[str, int]
    vault: int


@dataclass(frozen=True)
class MeshPlan:
    """Everything a service's environment is computed from."""

    layout: DataLayout
    ports: MeshPorts
    database_urls: Mapping[str, str]  # service name → URL, for services that keep state

    def address(self, service: str) -> str:
        return f"{LOOPBACK}:{self.ports.services[service]}"

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


# Settings of a service that depend on this machine rather than on the graph.
_LOCAL_SETTINGS: dict[str, Callable[[MeshPlan], dict[str, str]]] = {
    "auth": _auth_keys,
    "secrets": _openbao_login,
    "system": _system_view,
}


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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise MeshError(f"--port must be 0-65535, got {self.port}")
        unknown = set(self.service_env) - {service.name for service in SERVICES}
        if unknown:
            raise MeshError(f"service_env names services that are not built: {sorted(unknown)}")
        # The URL is not echoed: it may carry a password.
        if self.database_url is not None and not self.database_url.startswith(_DATABASE_SCHEMES):
            raise MeshError("--database-url must be a sqlite:// or postgresql:// URL")

    def pick_ports(self) -> MeshPorts:
        """Check the edge port is free (or pick one when it is 0) and pick distinct free loopback
        ports for Envoy's admin, every service and OpenBao."""
        with ExitStack() as held:
            # All sockets stay bound until every port is chosen, so no two choices coincide.
            if self.port:
                held.enter_context(_bind(self.host, self.port))
                edge = self.port
            else:
                edge = _bound_port(held.enter_context(_bind(self.host, 0)))
            admin = _bound_port(held.enter_context(_bind(LOOPBACK, 0)))
            services = {
                service.name: _bound_port(held.enter_context(_bind(LOOPBACK, 0))) for service in SERVICES
            }
            vault = _bound_port(held.enter_context(_bind(LOOPBACK, 0)))
        return MeshPorts(edge=edge, admin=admin, services=services, vault=vault)


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

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        # Logs may name users and paths: private like the rest of the data directory.
        with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.write(f"--- pyth-on: starting {name} at {stamp} ---\n".encode())
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

    def describe_exit(self, code: int) -> str:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"{self.name} {how}; last lines of {self.log_path}:\n{self.log_tail()}"


class Mesh:
    """A running mesh. `start()` starts OpenBao first and returns once the edge answers 200 on
    /health; `stop()` stops Envoy first, then the services, then OpenBao (SIGTERM, then SIGKILL after
    the grace period). Usable as a context manager. The data directory is locked while the mesh
    runs, so two meshes never share one."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.layout = DataLayout.at(config.data_dir)
        self._ports: MeshPorts | None = None
        self._children: dict[str, _Child] = {}
        self._lock: Any = None

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
        """host:port of a service's gRPC server (bypassing the edge)."""
        return f"{LOOPBACK}:{self.ports.services[name]}"

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
        """Process id of every process started (each also leads its own process group)."""
        return {name: child.pid for name, child in self._children.items()}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Mesh:
        """Start OpenBao and bring it to service, start every service, wait for their gRPC health,
        then start Envoy and wait for /health.

        Raises MeshError, naming the process that failed with the tail of its log; whatever was
        started is stopped again before it raises."""
        if self._children:
            raise MeshError("the mesh is already running")
        try:
            self._take_lock()
            self.layout.prepare()
            self._ports = self.config.pick_ports()
            plan = MeshPlan(
                layout=self.layout,
                ports=self._ports,
                database_urls={
                    service.name: self.database_url(service.name) for service in SERVICES if service.database
                },
            )
            atexit.register(self.stop)
            migrate_all(plan.database_urls)  # once, before any service starts (services only check)
            deadline = time.monotonic() + self.config.startup_timeout_seconds
            self._start_openbao(plan, deadline)
            for service in SERVICES:
                self._spawn(
                    service.name,
                    [sys.executable, "-m", f"services.{service.name}"],
                    self._service_env(service, plan),
                )
            for service in SERVICES:
                self._wait_serving(service.name, plan.address(service.name), deadline)
            self._start_edge(plan)
            self._wait_edge(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Envoy, then the services, then OpenBao; idempotent. Removes nothing from the data
        directory."""
        atexit.unregister(self.stop)
        edge = self._children.pop(EDGE, None)
        if edge is not None:
            self._terminate([edge])
        vault = self._children.pop(OPENBAO, None)
        services = list(self._children.values())
        self._children.clear()
        self._terminate(services)
        if vault is not None:
            self._terminate([vault])
        self._release_lock()

    def exited(self) -> tuple[str, str] | None:
        """(name, description) of a process that has ended, if any, else None."""
        for name, child in self._children.items():
            code = child.exit_code()
            if code is not None:
                return name, child.describe_exit(code)
        return None

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

    def _service_env(self, service: ServiceNode, plan: MeshPlan) -> dict[str, str]:
        env = self._base_env()
        env.update({name: os.environ[name] for name in service.outside_variables if name in os.environ})
        env.update(
            {
                "PYTHONON_HOST": LOOPBACK,
                "PYTHONON_PORT": str(plan.ports.services[service.name]),
                "PYTHONON_LOG_LEVEL": self.config.log_level,
                "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(self.layout.identity_public_key),
            }
        )
        env.update(
            service_graph.wiring_environment(service.name, plan.address, plan.database_urls.get(service.name))
        )
        if service.name in _LOCAL_SETTINGS:
            env.update(_LOCAL_SETTINGS[service.name](plan))
        env.update(self.config.service_env.get(service.name, {}))
        return env

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        self._children[name] = _Child(name, argv, env, self.layout.log(name), cwd=self.layout.root)

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

    def _wait_serving(self, name: str, address: str, deadline: float) -> None:
        while True:
            self._fail_if_exited(name)
            if _grpc_serving(address):
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
                "admin_port": plan.ports.admin,
                "upstreams": {name: plan.address(name) for name in service_graph.edge_calls()},
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


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _grpc_serving(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
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
