"""Reading a service's settings from its environment once, at start-up, into typed values."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from services.platform import service_graph


class SettingsError(Exception):
    """A setting is missing or malformed; the service refuses to start."""


@dataclass(frozen=True)
class Setting:
    """One documented variable: its name, its default as an operator would write it (None: required,
    or unset unless given), and what it means. `wired`: `pyth-on up` sets it itself (an address,
    a database URL, a key file of the data directory), so a copy in the runner's environment is
    refused; set it yourself only when you run the service some other way.

    Each settings module declares its variables in a `SETTINGS` table of these; the reference
    (docs/settings.md, `tools/settings_reference.py`) and the runner's pass-through read the tables,
    and a test checks each table against what the module's loader reads."""

    name: str
    default: str | None
    meaning: str
    wired: bool = False


# Read by every service through ServerSettings and database_url below.
COMMON_SETTINGS: tuple[Setting, ...] = (
    Setting("PYTHONON_HOST", "127.0.0.1", "Address the service's gRPC server listens on.", wired=True),
    Setting("PYTHONON_PORT", None, "Port of the service's gRPC server (0 picks a free one).", wired=True),
    Setting(
        "PYTHONON_LOG_LEVEL",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR; logs are JSON lines. `pyth-on up` gives every service its "
        "`--log-level`, whose default is this variable.",
    ),
    Setting(
        "PYTHONON_IDENTITY_PUBLIC_KEY_FILE",
        None,
        "PEM Ed25519 public key that verifies the identity assertions the edge forwards.",
        wired=True,
    ),
    Setting(
        "PYTHONON_MESH_CA_FILE",
        None,
        "PEM certificate of the mesh's CA. A service accepts a call only from a client certificate it "
        "signed, and calls a service only if that service's certificate is signed by it.",
        wired=True,
    ),
    Setting(
        "PYTHONON_MESH_CERT_FILE",
        None,
        "PEM certificate of this service, signed by the mesh CA, naming the service as its DNS SAN: "
        "presented to its callers and to the services it calls.",
        wired=True,
    ),
    Setting("PYTHONON_MESH_KEY_FILE", None, "PEM private key of PYTHONON_MESH_CERT_FILE.", wired=True),
    Setting(
        "PYTHONON_HEALTH_PORT",
        None,
        "Port of a second, plaintext gRPC server that answers only grpc.health.v1 (the kubelet's gRPC "
        "probes speak no TLS); unset: none. The Kubernetes manifests set it; leave it unset under `pyth-on up` "
        "(every service would want the same port).",
    ),
    Setting(
        "PYTHONON_SHUTDOWN_GRACE_SECONDS",
        "5",
        "Seconds in-flight calls get to finish after SIGTERM before the server stops.",
    ),
    Setting(
        "PYTHONON_DATABASE_URL",
        None,
        "SQLAlchemy URL (sqlite:// or postgresql://) of every service's database when its own "
        "PYTHONON_<SERVICE>_DATABASE_URL is unset. `pyth-on up` and `pyth-on migrate` read it as the "
        "default of `--database-url` and give each service its own variable instead.",
    ),
)


def wiring_settings(service: str, *, built_only: bool = True) -> tuple[Setting, ...]:
    """The variables that wire `service` into a mesh, from the service graph: the address of each
    service it calls (by default only the built ones) and, if it keeps state, its database URL. All
    set by `pyth-on up`."""
    wiring = [
        Setting(
            service_graph.address_variable(callee),
            None,
            f"host:port of the {callee} service's gRPC server."
            + ("" if service_graph.service(callee).built else " Not built in this version, so unset."),
            wired=True,
        )
        for callee in service_graph.calls(service, built_only=built_only)
    ]
    if service_graph.service(service).database:
        wiring.append(
            Setting(
                service_graph.database_variable(service),
                None,
                f"SQLAlchemy URL of the {service} service's database (falls back to PYTHONON_DATABASE_URL); "
                "its schema must be at head (`pyth-on migrate`).",
                wired=True,
            )
        )
    return tuple(wiring)


class Environment:
    """Typed accessors over an environment mapping that name the variable in every error."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def text(self, name: str, default: str | None = None) -> str:
        value = self._environ.get(name, default)
        if value is None or value == "":
            if default is not None:
                return default
            raise SettingsError(f"{name} is required but not set")
        return value

    def integer(
        self, name: str, default: int | None = None, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            if default is None:
                raise SettingsError(f"{name} is required but not set")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be at most {maximum}, got {value}")
        return value

    def port(self, name: str, default: int | None = None) -> int:
        value = self.integer(name, default)
        if not 0 <= value <= 65535:
            raise SettingsError(f"{name} must be a TCP port (0-65535), got {value}")
        return value

    def existing_file(self, name: str) -> Path:
        path = Path(self.text(name))
        if not path.is_file():
            raise SettingsError(f"{name} names {path}, which is not a readable file")
        return path

    def absolute_path(self, name: str) -> Path | None:
        """An optional setting that, when given, must be an absolute path."""
        value = self.optional(name)
        if value is None:
            return None
        if not Path(value).is_absolute():
            raise SettingsError(f"{name} must be an absolute path")
        return Path(value)

    def optional(self, name: str) -> str | None:
        return self._environ.get(name) or None


MESH_CA_VARIABLE = "PYTHONON_MESH_CA_FILE"
MESH_CERT_VARIABLE = "PYTHONON_MESH_CERT_FILE"
MESH_KEY_VARIABLE = "PYTHONON_MESH_KEY_FILE"
_MESH_VARIABLES = (MESH_CA_VARIABLE, MESH_CERT_VARIABLE, MESH_KEY_VARIABLE)


@dataclass(frozen=True)
class MeshTls:
    """A member's mesh identity for mutual TLS: the CA it trusts, its certificate, its key (PEM).
    `name` is the DNS name its certificate carries (a service's name, "edge" or "runner")."""

    name: str
    ca_pem: bytes
    certificate_pem: bytes
    key_pem: bytes

    @classmethod
    def from_pem(cls, ca_pem: bytes, certificate_pem: bytes, key_pem: bytes) -> MeshTls:
        """Checked as a TLS handshake would, so a wrong file is a clear error at start-up rather than
        every call failing later: ValueError when the certificate is not signed by the CA, is not
        valid now, names no DNS SAN, or does not match the key."""
        try:
            ca = x509.load_pem_x509_certificate(ca_pem)
            certificate = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError:
            raise ValueError("the CA and the certificate must be PEM certificates") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise ValueError("the key must be an unencrypted PEM private key") from None
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("the certificate is not signed by the mesh CA") from None
        now = datetime.datetime.now(datetime.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise ValueError(
                f"the certificate is not valid now (valid until {certificate.not_valid_after_utc})"
            )
        if key.public_key() != certificate.public_key():
            raise ValueError("the key is not the certificate's")
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = None
        dns_names = names.get_values_for_type(x509.DNSName) if names else []
        if not dns_names:
            raise ValueError("the certificate names no DNS subject alternative name")
        return cls(dns_names[0], ca_pem, certificate_pem, key_pem)

    @classmethod
    def load(cls, env: Environment) -> MeshTls:
        """From the three files the PYTHONON_MESH_* variables name; SettingsError naming the
        variable or what is wrong."""
        files = [env.existing_file(name) for name in _MESH_VARIABLES]
        try:
            return cls.from_pem(*(path.read_bytes() for path in files))
        except ValueError as error:
            raise SettingsError(f"{', '.join(_MESH_VARIABLES)}: {error}") from None

    @classmethod
    def load_if_given(cls, env: Environment) -> MeshTls | None:
        """As `load`, or None when none of the variables is set (a client outside any mesh, e.g.
        against an in-process test server); setting only some of them is an error."""
        given = [name for name in _MESH_VARIABLES if env.optional(name)]
        if not given:
            return None
        return cls.load(env)


@dataclass(frozen=True)
class ServerSettings:
    """What every service needs: where to listen, how to log, how to verify identity, and its mesh
    identity (`mesh_tls`: None only for in-process test servers, see ephemeral_server_settings)."""

    service: str
    host: str
    port: int
    log_level: str
    identity_public_key_file: Path
    otlp_endpoint: str | None
    shutdown_grace_seconds: float
    mesh_tls: MeshTls | None
    # Plaintext grpc.health.v1 only, for probes that cannot present a mesh certificate (Kubernetes).
    health_port: int | None = None

    @classmethod
    def load(cls, service: str, env: Environment) -> ServerSettings:
        level = env.text("PYTHONON_LOG_LEVEL", "INFO").upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"PYTHONON_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        host = env.text("PYTHONON_HOST", "127.0.0.1")
        port = env.port("PYTHONON_PORT")
        identity_public_key_file = env.existing_file("PYTHONON_IDENTITY_PUBLIC_KEY_FILE")
        mesh_tls = MeshTls.load(env)
        if mesh_tls.name != service:
            raise SettingsError(f"{MESH_CERT_VARIABLE} names {mesh_tls.name!r}, not the {service} service")
        return cls(
            service=service,
            host=host,
            port=port,
            log_level=level,
            identity_public_key_file=identity_public_key_file,
            otlp_endpoint=env.optional("OTEL_EXPORTER_OTLP_ENDPOINT"),
            shutdown_grace_seconds=float(env.integer("PYTHONON_SHUTDOWN_GRACE_SECONDS", 5)),
            mesh_tls=mesh_tls,
            health_port=env.port("PYTHONON_HEALTH_PORT") if env.optional("PYTHONON_HEALTH_PORT") else None,
        )


def ephemeral_server_settings(
    service: str, identity_public_key_file: Path, mesh_tls: MeshTls | None = None
) -> ServerSettings:
    """Settings for a server on a free loopback port, stopped at once: in-process tests and tools.
    Without `mesh_tls` it serves plaintext (a server of a mesh always has it: ServerSettings.load)."""
    return ServerSettings(
        service=service,
        host="127.0.0.1",
        port=0,
        log_level="INFO",
        identity_public_key_file=identity_public_key_file,
        otlp_endpoint=None,
        shutdown_grace_seconds=0,
        mesh_tls=mesh_tls,
    )


def database_url(env: Environment, service: str) -> str:
    """The service's SQLAlchemy URL: PYTHONON_<SERVICE>_DATABASE_URL, else PYTHONON_DATABASE_URL."""
    specific = service_graph.database_variable(service)
    url = env.optional(specific) or env.optional("PYTHONON_DATABASE_URL")
    if not url:
        raise SettingsError(f"{specific} (or PYTHONON_DATABASE_URL) is required but not set")
    if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise SettingsError(f"{specific} must be a sqlite:// or postgresql:// URL")
    return url


def service_address(env: Environment, service: str) -> str:
    """host:port of a service this one calls (or several, comma-separated: its replicas), from the variable the service graph names for it
    (e.g. PYTHONON_AUDIT_ADDRESS); SettingsError naming the variable when it is missing or malformed."""
    variable = service_graph.address_variable(service)
    address = env.text(variable).strip()
    try:
        service_graph.split_addresses(address)
    except ValueError as error:
        raise SettingsError(f"{variable}: {error}") from None
    return address
