"""Settings: every PYTHONON_* variable is declared in a settings module's table (with the default its
loader really uses), the generated reference is fresh, the runner gives each service the settings of
its own environment and refuses those it cannot honour, and `pyth-on --version`."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.audit.settings import AuditSettings
from services.auth.settings import AuthSettings
from services.executor.settings import ExecutorSettings
from services.generator.settings import GeneratorSettings
from services.packages.settings import PackagesSettings
from services.platform import service_graph
from services.platform.settings import COMMON_SETTINGS, Environment, ServerSettings
from services.runner.cli import main
from services.runner.mesh import SERVICES, Mesh, MeshConfig, MeshError, MeshPlan, MeshPorts, operator_settings
from services.runner.settings_catalog import catalog
from services.secrets.settings import SecretsSettings
from services.system.settings import SystemSettings
from services.zk.settings import ZkSettings
from tools import settings_reference

ROOT = Path(__file__).resolve().parents[2]
BUILT = [node.name for node in SERVICES]
LOADERS: dict[str, Any] = {
    "auth": AuthSettings,
    "audit": AuditSettings,
    "executor": ExecutorSettings,
    "generator": GeneratorSettings,
    "packages": PackagesSettings,
    "secrets": SecretsSettings,
    "system": SystemSettings,
    "zk": ZkSettings,
}
# Read only on a branch the runner's wiring does not take: AppRole instead of a token file, the
# shared database URL when a service has none of its own.
READ_ONLY_ON_OTHER_BRANCHES = {"PYTHONON_SECRETS_VAULT_APPROLE_MOUNT", "PYTHONON_DATABASE_URL"}
# Set by the kubernetes backend on each sandbox pod it creates (k8s/README.md), never by an operator.
SET_ON_SANDBOX_PODS = {"PYTHONON_SANDBOX_EXECUTOR_ADDRESS", "PYTHONON_SANDBOX_CLAIM_TOKEN"}


class RecordingEnvironment(Environment):
    """An Environment that notes every variable read and the default the loader passed."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(environ)
        self.reads: dict[str, str | None] = {}

    def _note(self, name: str, default: object) -> None:
        self.reads.setdefault(name, None if default is None else str(default))

    def text(self, name: str, default: str | None = None) -> str:
        self._note(name, default)
        return super().text(name, default)

    def integer(
        self, name: str, default: int | None = None, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        self._note(name, default)
        return super().integer(name, default, minimum=minimum, maximum=maximum)

    def optional(self, name: str) -> str | None:
        self._note(name, None)
        return super().optional(name)


def _declared(service: str) -> dict[str, str | None]:
    return {setting.name: setting.default for setting in (*COMMON_SETTINGS, *catalog()[service])}


def test_the_settings_tables_match_what_each_loader_reads(tmp_path: Path) -> None:
    mesh = Mesh(MeshConfig(port=0, data_dir=tmp_path))
    mesh.layout.prepare()
    mesh.openbao_files.service_token.write_text("token\n")
    plan = MeshPlan(
        layout=mesh.layout,
        ports=MeshPorts(edge=8080, services={name: 5000 + i for i, name in enumerate(BUILT)}, vault=8200),
        database_urls={node.name: mesh.layout.sqlite_url(node.name) for node in SERVICES if node.database},
    )
    assert sorted(LOADERS) == sorted(BUILT)
    every_read: set[str] = set()
    for node in SERVICES:
        env = RecordingEnvironment(mesh._service_env(node, plan))
        ServerSettings.load(node.name, env)
        LOADERS[node.name].load(env)
        read = {name: default for name, default in env.reads.items() if name.startswith("PYTHONON_")}
        declared = _declared(node.name)
        # Every variable read is declared, with the default the loader uses.
        assert {name: declared.get(name, "UNDECLARED") for name in read} == read, node.name
        every_read |= set(read)
    # And nothing is declared that no loader reads (a stale row).
    every_declared = {setting.name for table in catalog().values() for setting in table}
    assert every_declared - every_read == READ_ONLY_ON_OTHER_BRANCHES


def test_every_pythonon_variable_named_in_the_services_code_is_declared() -> None:
    declared = {setting.name for table in catalog().values() for setting in table}
    named = {
        (match.group(0), path.relative_to(ROOT).as_posix())
        for path in (ROOT / "services").rglob("*.py")
        for match in re.finditer(r"\bPYTHONON_[A-Z0-9_]+\b", path.read_text())
        if not match.group(0).endswith("_")  # a prefix or a marker, not a variable
        and match.group(0) not in SET_ON_SANDBOX_PODS
    }
    assert {(name, where) for name, where in named if name not in declared} == set()


def test_the_settings_reference_is_fresh_and_a_stale_one_is_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settings_reference.main(["--check"]) == 0, "docs/settings.md is stale: run `make generate`"
    reference = (ROOT / "docs" / "settings.md").read_text()
    for node in SERVICES:
        assert f"\n## The {node.name} service\n" in reference
    assert "| `PYTHONON_AUTH_USER_RATE_BURST` | `200` | Requests a user may make at once" in reference

    stale = tmp_path / "settings.md"
    stale.write_text(reference.replace("`200`", "`201`"))
    assert settings_reference.main(["--check", "--output", str(stale)]) == 1
    assert "settings.md is stale: run `make generate`" in capsys.readouterr().err
    assert settings_reference.main(["--output", str(stale)]) == 0
    assert stale.read_text() == reference


def test_the_runner_gives_each_service_its_own_settings_and_the_common_ones() -> None:
    given = operator_settings(
        {
            "PYTHONON_AUTH_USER_RATE_BURST": "7",
            "PYTHONON_EXECUTOR_POOL_SIZE": "0",
            "PYTHONON_SHUTDOWN_GRACE_SECONDS": "1",
            "PYTHONON_DATABASE_URL": "postgresql://u:hunter2@db/x",  # the runner's own: not passed on
            "PYTHONON_GENERATOR_MODEL": "m",
            "PYTHONON_TEST_POSTGRES_URL": "x",  # not a service's
            "PATH": "/bin",
        }
    )
    assert given == {
        "auth": {"PYTHONON_AUTH_USER_RATE_BURST": "7", "PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "executor": {"PYTHONON_EXECUTOR_POOL_SIZE": "0", "PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "secrets": {"PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "audit": {"PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "generator": {"PYTHONON_GENERATOR_MODEL": "m", "PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "packages": {"PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "zk": {"PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
        "system": {"PYTHONON_SHUTDOWN_GRACE_SECONDS": "1"},
    }


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"PYTHONON_AUTH_DATABASE_URL": "sqlite:///x.db"},
            "PYTHONON_AUTH_DATABASE_URL is set by pyth-on up itself (from the data directory and the "
            "service graph): unset it (every setting: docs/settings.md)",
        ),
        (
            {"PYTHONON_PORT": "1", "PYTHONON_AUTH_USER_RATE_BURSTT": "3"},
            "PYTHONON_AUTH_USER_RATE_BURSTT is not a setting of the auth service; PYTHONON_PORT is set by "
            "pyth-on up itself (from the data directory and the service graph): unset them (every "
            "setting: docs/settings.md)",
        ),
    ],
)
def test_the_runner_refuses_settings_it_cannot_honour(environ: dict[str, str], message: str) -> None:
    with pytest.raises(MeshError) as refused:
        operator_settings(environ)
    assert str(refused.value) == message


def test_pyth_on_up_refuses_a_wired_setting_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYTHONON_SECRETS_VAULT_ADDR", "http://vault.example:8200")
    assert main(["up", "--port", "0", "--data-dir", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err == (
        "pyth-on: PYTHONON_SECRETS_VAULT_ADDR is set by pyth-on up itself (from the data directory and "
        "the service graph): unset it (every setting: docs/settings.md)\n"
    )
    assert not (tmp_path / "data").exists()


def test_a_setting_in_the_runners_environment_takes_effect_through_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONON_AUTH_USER_RATE_BURST", "2")
    monkeypatch.setenv("PYTHONON_AUTH_USER_RATE_PER_MINUTE", "1")
    with (
        Mesh(MeshConfig(port=0, data_dir=tmp_path / "data")) as mesh,
        httpx.Client(base_url=mesh.url, timeout=30) as client,
    ):
        user = client.post(
            "/api/register", json={"email": "burst@example.com", "password": "correct horse battery staple"}
        ).json()
        statuses = [
            client.post("/api/verify", headers={"x-api-key": user["apiKey"]}, json={}).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        environ = Path(f"/proc/{mesh.pids['executor']}/environ").read_bytes()
        assert b"PYTHONON_AUTH_USER_RATE_BURST" not in environ  # only the service it belongs to


def test_pyth_on_version_prints_the_package_version() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "services.runner.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert printed.stdout == f"pyth-on {importlib.metadata.version('pyth-on')}\n"
    assert importlib.metadata.version("pyth-on") == "0.1.0"
    assert service_graph.SECTIONS  # the graph the reference is built from is importable on its own
