"""`pyth-on migrate`: bring every database-owning service's schema to head, once, before the services
start (the runner calls it too). Services only check their schema at start-up, so replicas never
race each other to migrate; two migrators on one PostgreSQL database wait for each other (see
`Database.migrate`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy.engine import make_url

from services.platform.db import Database, Migration, Schema, normalize_url
from services.platform.service_graph import built_services
from services.runner.layout import DataLayout

# The built services that own a database (the service graph says which), in the graph's order.
# Their migrations live in services/<name>/migrations, their version table is alembic_version_<name>
# (see Schema).
DATABASE_SERVICES: tuple[str, ...] = tuple(node.name for node in built_services() if node.database)


class MigrationError(Exception):
    """A database could not be migrated; the message names the service and why (never the URL,
    which may carry a password)."""


def database_urls(
    data_dir: Path | str, database_url: str | None, services: tuple[str, ...]
) -> dict[str, str]:
    """Each service's URL as `pyth-on up` gives it: `database_url` for all, else a SQLite file per
    service in the data directory."""
    if database_url is not None:
        return dict.fromkeys(services, database_url)
    layout = DataLayout.at(data_dir)
    for directory in (layout.root, layout.db):
        directory.mkdir(mode=0o700, exist_ok=True, parents=True)
    return {name: layout.sqlite_url(name) for name in services}


def migrate_service(service: str, url: str) -> Migration:
    """Bring one service's schema to head (a Kubernetes Job runs this with the service's URL)."""
    if service not in DATABASE_SERVICES:
        raise MigrationError(
            f"{service!r} is not a built service with a database; those are: {', '.join(DATABASE_SERVICES)}"
        )
    _create_private_sqlite_file(url)
    database = Database(url)
    try:
        return database.migrate(Schema(service))
    except sa.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise MigrationError(f"{service}: cannot migrate its database: {reason}") from None
    except CommandError as error:  # e.g. a revision in the database that these migrations lack
        raise MigrationError(f"{service}: cannot migrate its database: {error}") from None
    finally:
        database.dispose()


def migrate_all(urls: Mapping[str, str]) -> list[Migration]:
    """Migrate the database of every service named in `urls` (service name → URL)."""
    return [migrate_service(service, url) for service, url in urls.items()]


def _create_private_sqlite_file(url: str) -> None:
    """A SQLite database holds password hashes and keys' ciphertext: create it readable by its
    owner only, whatever the umask (SQLite gives its -wal and -shm files the same mode)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
