"""The service graph: one table that the runner's wiring, the system service's view and the edge's
upstreams are derived from, and that depends on nothing of the edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from services.platform import service_graph
from services.platform.service_graph import (
    SECTIONS,
    address_variable,
    built_services,
    calls,
    database_variable,
    edge_calls,
    edges,
    service,
    split_address,
    wiring_environment,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_names_every_section_once_and_what_is_built() -> None:
    assert SECTIONS == ("auth", "executor", "secrets", "audit", "generator", "packages", "zk", "system")
    assert [node.name for node in built_services()] == [
        "auth",
        "executor",
        "secrets",
        "audit",
        "generator",
        "packages",
        "zk",
        "system",
    ]
    assert [node.name for node in service_graph.SERVICES if node.database] == [
        "auth",
        "audit",
        "packages",
        "zk",
    ]
    assert [node.name for node in service_graph.SERVICES if node.vault] == ["secrets", "system"]
    assert service("generator").outside_variables == ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


def test_calls_to_unbuilt_services_wait_until_they_are_built() -> None:
    assert calls("executor") == ("secrets", "packages", "audit")
    assert calls("executor", built_only=False) == ("secrets", "packages", "audit")
    assert calls("generator", built_only=False) == ("executor", "secrets", "packages", "audit")
    assert calls("zk", built_only=False) == ("executor", "audit")
    assert calls("system") == ("auth", "executor", "secrets", "audit", "generator", "packages", "zk")
    assert calls("audit") == ()


def test_the_edges_of_the_built_mesh() -> None:
    assert set(edges()) == {
        ("edge", "auth"), ("edge", "executor"), ("edge", "secrets"), ("edge", "audit"), ("edge", "system"),
        ("auth", "audit"),
        ("executor", "secrets"), ("executor", "audit"),
        ("secrets", "audit"),
        ("system", "auth"), ("system", "executor"), ("system", "secrets"), ("system", "audit"),
        ("edge", "packages"), ("executor", "packages"), ("packages", "audit"), ("system", "packages"),
        ("edge", "zk"), ("zk", "executor"), ("zk", "audit"), ("system", "zk"),
        ("edge", "generator"), ("generator", "executor"), ("generator", "secrets"), ("generator", "packages"),
        ("generator", "audit"), ("system", "generator"),
    }  # fmt: skip
    assert edge_calls() == ("auth", "executor", "secrets", "audit", "generator", "packages", "zk", "system")
    assert ("zk", "executor") in set(edges(built_only=False))
    assert service_graph.EXT_AUTHZ in edge_calls()


def test_variable_names_come_from_one_function() -> None:
    assert address_variable("audit") == "PYTHONON_AUDIT_ADDRESS"
    assert database_variable("auth") == "PYTHONON_AUTH_DATABASE_URL"
    with pytest.raises(ValueError, match="unknown service 'billing'"):
        address_variable("billing")
    with pytest.raises(ValueError, match="the secrets service has no database"):
        database_variable("secrets")


def test_a_services_wiring_is_derived_from_the_table() -> None:
    def address_of(name: str) -> str:
        return f"{name}.mesh:50051"

    assert wiring_environment("executor", address_of) == {
        "PYTHONON_SECRETS_ADDRESS": "secrets.mesh:50051",
        "PYTHONON_PACKAGES_ADDRESS": "packages.mesh:50051",
        "PYTHONON_AUDIT_ADDRESS": "audit.mesh:50051",
    }
    assert wiring_environment("auth", address_of, "sqlite:///auth.db") == {
        "PYTHONON_AUDIT_ADDRESS": "audit.mesh:50051",
        "PYTHONON_AUTH_DATABASE_URL": "sqlite:///auth.db",
    }
    assert wiring_environment("audit", address_of, "sqlite:///audit.db") == {
        "PYTHONON_AUDIT_DATABASE_URL": "sqlite:///audit.db"
    }
    with pytest.raises(ValueError, match="the auth service needs a database URL"):
        wiring_environment("auth", address_of)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:5001", ("127.0.0.1", 5001)),
        ("auth.pythonon.svc.cluster.local:50051", ("auth.pythonon.svc.cluster.local", 50051)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_addresses_are_host_and_port(address: str, parsed: tuple[str, int]) -> None:
    assert split_address(address) == parsed


@pytest.mark.parametrize(
    "address", ["auth", "auth:", ":80", "auth:0", "auth:65536", "auth:http", "::1:80", "a b:1"]
)
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="expected host:port with a port 1-65535"):
        split_address(address)


def test_importing_the_platform_loads_nothing_of_the_edge() -> None:
    modules = sorted(
        f"services.platform.{path.stem}" for path in (ROOT / "services/platform").glob("[!_]*.py")
    )
    script = "import sys\n" + "".join(f"import {name}\n" for name in modules) + "print('edge' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_no_service_imports_the_edge_but_the_runner_that_renders_its_config() -> None:
    importers = set()
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name == "edge" or name.startswith("edge.") for name in names):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"services/runner/mesh.py"}
