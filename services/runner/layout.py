"""The data directory of a local mesh: where keys, databases, logs and the edge config live, and
the keys created on first start. Everything here survives restarts; nothing is ever deleted."""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from services.platform import service_graph
from services.platform.identity import generate_private_key_pem, public_key_pem
from services.runner.mesh_ca import MeshCA

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
AUTH_SECRET_BYTES = 32
# Who holds a mesh certificate besides the built services: Envoy, and the runner (its health checks).
RUNNER_IDENTITY = "runner"
MESH_IDENTITIES: tuple[str, ...] = (
    *(node.name for node in service_graph.built_services()),
    service_graph.EDGE,
    RUNNER_IDENTITY,
)
# sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


@dataclass(frozen=True)
class DataLayout:
    """Paths inside the data directory (`root` is absolute)."""

    root: Path

    @classmethod
    def at(cls, data_dir: Path | str) -> DataLayout:
        return cls(Path(data_dir).expanduser().resolve())

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def db(self) -> Path:
        return self.root / "db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def packages(self) -> Path:
        """The package environments (content-addressed, read-only once built) and users' markers."""
        return self.root / "packages"

    @property
    def secret_markers(self) -> Path:
        """Which users have secrets (the secrets service's markers, read by the executor)."""
        return self.root / "secret-markers"

    @property
    def identity_key(self) -> Path:
        """Ed25519 private key that signs identity assertions (the auth service's)."""
        return self.keys / "identity.key"

    @property
    def identity_public_key(self) -> Path:
        """Its public key, which every service verifies assertions with."""
        return self.keys / "identity.pub"

    @property
    def access_token_key(self) -> Path:
        """Ed25519 private key that signs users' access JWTs."""
        return self.keys / "access-token.key"

    @property
    def auth_secret_key(self) -> Path:
        """32 random bytes, base64: the auth service's key for API-key digests and encryption."""
        return self.keys / "auth-secret.key"

    @property
    def mesh_keys(self) -> Path:
        """The mesh CA and every member's certificate and key (see mesh_ca)."""
        return self.keys / "mesh"

    @property
    def mesh_ca_certificate(self) -> Path:
        return self.mesh_keys / "ca.pem"

    @property
    def mesh_ca_key(self) -> Path:
        return self.mesh_keys / "ca.key"

    def mesh_certificate(self, identity: str) -> Path:
        """`identity`'s certificate: a service's name, "edge" or "runner"."""
        return self.mesh_keys / f"{identity}.pem"

    def mesh_key(self, identity: str) -> Path:
        return self.mesh_keys / f"{identity}.key"

    @property
    def envoy_config(self) -> Path:
        return self.root / "envoy.json"

    @property
    def envoy_admin_socket(self) -> Path:
        """Envoy's admin interface: a Unix socket (0600, in this 0700 directory), never a TCP port."""
        return self.root / "envoy-admin.sock"

    @property
    def lock_file(self) -> Path:
        return self.root / "mesh.lock"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def sqlite_url(self, service: str) -> str:
        return f"sqlite:///{self.db / f'{service}.db'}"

    def prepare(self) -> list[Path]:
        """Create the directories (0700) and any missing key (0600); return the files created.

        Idempotent: existing keys are kept (and their modes tightened), so tokens and API keys
        issued before a restart stay valid after it."""
        for directory in (self.root, self.keys, self.mesh_keys, self.db, self.logs):
            directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask and ignored for a directory that exists.
            directory.chmod(PRIVATE_DIR_MODE)

        created = []
        for path, make in (
            (self.identity_key, generate_private_key_pem),
            (self.access_token_key, generate_private_key_pem),
            (self.auth_secret_key, lambda: base64.b64encode(secrets.token_bytes(AUTH_SECRET_BYTES)) + b"\n"),
        ):
            if path.exists():
                path.chmod(PRIVATE_FILE_MODE)
            else:
                write_private_file(path, make())
                created.append(path)

        # Derived, so always rewritten from the private key when it is missing or stale.
        public = public_key_pem(self.identity_key.read_bytes())
        if not self.identity_public_key.exists() or self.identity_public_key.read_bytes() != public:
            write_private_file(self.identity_public_key, public)
            created.append(self.identity_public_key)
        else:
            self.identity_public_key.chmod(PRIVATE_FILE_MODE)
        created += self._issue_mesh_certificates()
        return created

    def _issue_mesh_certificates(self) -> list[Path]:
        """The mesh CA, created once and kept; a fresh certificate and key for every member at
        every start (so a restart rotates them, and one left from another CA is replaced). Returns
        the files that did not exist before."""
        created = []
        if self.mesh_ca_key.exists() and self.mesh_ca_certificate.exists():
            self.mesh_ca_key.chmod(PRIVATE_FILE_MODE)
            try:
                ca = MeshCA.from_pem(self.mesh_ca_key.read_bytes(), self.mesh_ca_certificate.read_bytes())
            except ValueError as error:
                raise ValueError(f"{self.mesh_keys}: {error}; delete it to make a new mesh CA") from None
        else:
            ca = MeshCA.create()
            write_private_file(self.mesh_ca_key, ca.key_pem)
            write_private_file(self.mesh_ca_certificate, ca.certificate_pem)
            created += [self.mesh_ca_key, self.mesh_ca_certificate]
        for identity in MESH_IDENTITIES:
            issued = ca.issue(identity)
            for path, content in (
                (self.mesh_key(identity), issued.key_pem),
                (self.mesh_certificate(identity), issued.certificate_pem),
            ):
                if not path.exists():
                    created.append(path)
                write_private_file(path, content)
        return created


def write_private_file(path: Path, content: bytes) -> None:
    """Write `content` to `path` with mode 0600 from the first byte on, replacing it atomically so a
    crash never leaves a half-written key behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, PRIVATE_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
