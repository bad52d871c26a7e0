"""`pyth-on migrate`: every database-owning service's schema brought to head by one explicit step,
two migrators at once on one database both succeeding with one schema, and services that refuse to
start (exit 2) on a database that was not migrated instead of migrating it themselves."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.platform.db import Database, Schema, SchemaNotAtHead, create_engine
from services.runner.cli import main
from services.runner.layout import DataLayout
from services.runner.migrate import DATABASE_SERVICES, MigrationError, migrate_service
from tests.postgres import throwaway_database

HEADS = {service: Schema(service).head() for service in DATABASE_SERVICES}
# A table each service's first migration creates.
TABLES = {"audit": "audit_entries", "auth": "auth_users", "packages": "package_requirements", "zk": "zk_code"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        with throwaway_database() as url:
            yield url


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def version_rows(url: str, service: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                connection.execute(sa.text(f"SELECT version_num FROM alembic_version_{service}")).scalars()
            )
    finally:
        engine.dispose()


def pyth_on_migrate(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.runner.cli", "migrate", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_migrate_creates_every_schema_in_private_files_and_a_second_run_finds_it_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    old_umask = os.umask(0o022)
    try:
        assert main(["migrate", "--data-dir", str(data)]) == 0
    finally:
        os.umask(old_umask)
    assert capsys.readouterr().out.splitlines() == [
        f"{service}: schema created at {HEADS[service]}" for service in DATABASE_SERVICES
    ]
    layout = DataLayout.at(data)
    for service in DATABASE_SERVICES:
        database = layout.db / f"{service}.db"
        assert stat.S_IMODE(database.stat().st_mode) == 0o600
        assert TABLES[service] in tables(layout.sqlite_url(service))
        assert version_rows(layout.sqlite_url(service), service) == [HEADS[service]]
    assert stat.S_IMODE(layout.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.db.stat().st_mode) == 0o700

    assert main(["migrate", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{service}: already at {HEADS[service]}" for service in DATABASE_SERVICES
    ]


def test_one_service_is_migrated_on_its_own_url(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--service", "auth", "--database-url", database_url]) == 0
    assert capsys.readouterr().out == f"auth: schema created at {HEADS['auth']}\n"
    found = tables(database_url)
    assert {"auth_users", "alembic_version_auth"} <= found
    assert not {"audit_entries", "alembic_version_audit"} & found


def test_two_migrators_at_once_both_succeed_with_one_schema(database_url: str) -> None:
    # The URL travels in the environment, as an operator's password would.
    migrators = [pyth_on_migrate(env={"PYTHONON_DATABASE_URL": database_url}) for _ in range(2)]
    outputs = [migrator.communicate(timeout=120) for migrator in migrators]
    for migrator, (_out, err) in zip(migrators, outputs, strict=True):
        assert migrator.returncode == 0, err
        assert err == ""
    lines = sorted(line for out, _err in outputs for line in out.splitlines())
    # Each schema was created by exactly one of them; the other found it done.
    assert lines == sorted(
        [f"{service}: schema created at {HEADS[service]}" for service in DATABASE_SERVICES]
        + [f"{service}: already at {HEADS[service]}" for service in DATABASE_SERVICES]
    )
    for service in DATABASE_SERVICES:
        assert version_rows(database_url, service) == [HEADS[service]]
        assert TABLES[service] in tables(database_url)


def _service_env(layout: DataLayout, database_url: str, service: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHONON_PORT": "0",
        "PYTHONON_IDENTITY_PUBLIC_KEY_FILE": str(layout.identity_public_key),
        "PYTHONON_MESH_CA_FILE": str(layout.mesh_ca_certificate),
        "PYTHONON_MESH_CERT_FILE": str(layout.mesh_certificate(service)),
        "PYTHONON_MESH_KEY_FILE": str(layout.mesh_key(service)),
        "PYTHONON_DATABASE_URL": database_url,
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:1",
        "PYTHONON_EXECUTOR_ADDRESS": "127.0.0.1:1",
        "PYTHONON_PACKAGES_DIR": str(layout.root / "packages"),
        "PYTHONON_AUTH_IDENTITY_KEY_FILE": str(layout.identity_key),
        "PYTHONON_AUTH_ACCESS_TOKEN_KEY_FILE": str(layout.access_token_key),
        "PYTHONON_AUTH_SECRET_KEY_FILE": str(layout.auth_secret_key),
    }


@pytest.mark.parametrize("service", DATABASE_SERVICES)
def test_a_service_on_a_database_that_was_not_migrated_refuses_to_start(
    tmp_path: Path, database_url: str, service: str
) -> None:
    layout = DataLayout.at(tmp_path / "data")
    layout.prepare()
    ended = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=_service_env(layout, database_url, service),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.returncode == 2
    assert (
        f"pythonon-{service}: configuration error: the {service} database has no schema yet "
        f"(expected revision {HEADS[service]}); run `pyth-on migrate` first"
    ) in ended.stderr
    assert "Traceback" not in ended.stderr
    assert TABLES[service] not in tables(database_url)  # it did not migrate by itself


def test_a_schema_newer_than_the_code_is_refused_by_services_and_by_migrate(database_url: str) -> None:
    migrate_service("audit", database_url)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version_audit SET version_num = 'f00d'"))
    engine.dispose()

    database = Database(database_url)
    try:
        with pytest.raises(SchemaNotAtHead) as refused:
            database.require_at_head(Schema("audit"))
    finally:
        database.dispose()
    assert str(refused.value) == (
        f"the audit database's schema is at revision f00d, which this version does not know "
        f"(its latest is {HEADS['audit']}): a newer version migrated it; run that version"
    )
    with pytest.raises(MigrationError, match=r"^audit: cannot migrate its database: .*'f00d'"):
        migrate_service("audit", database_url)
    assert version_rows(database_url, "audit") == ["f00d"]


def test_a_database_that_cannot_be_reached_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "postgresql://pythonon:hunter2@127.0.0.1:1/pythonon"
    assert main(["migrate", "--service", "audit", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyth-on: audit: cannot migrate its database: connection failed")
    assert "hunter2" not in err
    assert "Traceback" not in err


def test_bad_arguments_are_refused_before_anything_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "mysql://root:hunter2@db/x"
    assert main(["migrate", "--database-url", url, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err == "pyth-on: --database-url must be a sqlite:// or postgresql:// URL\n"
    with pytest.raises(SystemExit) as exited:
        main(["migrate", "--service", "secrets", "--data-dir", str(tmp_path / "d")])
    assert exited.value.code == 2
    assert "invalid choice: 'secrets'" in capsys.readouterr().err
    with pytest.raises(MigrationError) as refused:
        migrate_service("secrets", f"sqlite:///{tmp_path / 'x.db'}")  # a service without a database
    assert (
        str(refused.value)
        == "'secrets' is not a built service with a database; those are: auth, audit, packages, zk"
    )
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "x.db").exists()


def alembic_view(schema: Schema) -> tuple[str | None, set[str]]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(schema.alembic_config())
    return script.get_current_head(), {known.revision for known in script.walk_revisions()}


@pytest.mark.parametrize("service", DATABASE_SERVICES)
def test_head_and_known_revisions_are_alembics_own_without_importing_alembic(service: str) -> None:
    """Services check their schema at start-up without Alembic's modules (~10 MiB of each one's
    memory); what they read from the migration files is what Alembic reads."""
    schema = Schema(service)
    head, known = alembic_view(schema)
    assert schema.head() == head
    assert all(schema.knows(revision) for revision in known) and not schema.knows("ffff")
    started = subprocess.run(
        [sys.executable, "-c", f"import sys, services.{service}.__main__; print('alembic' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert started.stdout.strip() == "False"


def test_a_line_of_revisions_has_the_last_as_head_and_a_fork_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = tmp_path / "svc" / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "svc" / "migrations" / "script.py.mako").write_text("")
    files = {"a.py": ("0001", None), "b.py": ("0002", "0001"), "c.py": ("0003", "0002")}
    for name, (revision, down) in files.items():
        (versions / name).write_text(
            f'"""{name}"""\nrevision = "{revision}"\ndown_revision: str | None = {down!r}\n'
        )
    monkeypatch.setattr("services.platform.db.SERVICES_ROOT", tmp_path)
    schema = Schema("svc")
    (tmp_path / "svc" / "migrations" / "env.py").write_text("")
    assert schema.head() == "0003" == alembic_view(schema)[0]
    assert schema.knows("0002") and not schema.knows("0004")
    (versions / "d.py").write_text('revision = "0004"\ndown_revision = "0002"\n')
    with pytest.raises(ValueError, match="more than one head: 0003, 0004"):
        schema.head()
