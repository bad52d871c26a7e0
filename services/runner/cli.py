"""The `pyth-on` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from services.executor.sandbox import BACKENDS
from services.platform.db import is_database_url
from services.runner import migrate as migrations
from services.runner.mesh import Mesh, MeshConfig, MeshError, Restart, operator_settings

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def version() -> str:
    """The installed package's version (its metadata, from pyproject.toml)."""
    try:
        return importlib.metadata.version("pyth-on")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (the pyth-on package is not installed; `make venv` installs it)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyth-on",
        description="Pyth-On, a self-hostable code-execution API.",
        epilog="The client's commands (run, secrets, packages, zk, generate, audit, login) come with "
        "the pyth-on-client package (sdk/python); `pyth-on run --help` and so on, where it is installed.",
    )
    parser.add_argument("--version", action="version", version=f"pyth-on {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the whole mesh on this machine and keep it running")
    up.add_argument(
        "--port", type=int, default=8080, help="the edge's port (default 8080; 0 picks a free one)"
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".data"),
        help="keys (OpenBao's unseal key among them: a single-machine convenience), databases, "
        "OpenBao's storage, logs (default .data)",
    )
    _add_database_url(up)
    up.add_argument(
        "--sandbox",
        choices=BACKENDS,
        default=os.environ.get("PYTHONON_EXECUTOR_BACKEND") or "bwrap",
        help="the executor's sandbox backend (default PYTHONON_EXECUTOR_BACKEND, else bwrap; gvisor "
        "needs runsc installed)",
    )
    up.add_argument(
        "--executors",
        type=int,
        default=1,
        help="executor processes behind the edge, each with its own sandboxes and share of the host "
        "(default 1)",
    )
    up.add_argument(
        "--log-level",
        type=str.upper,
        default=os.environ.get("PYTHONON_LOG_LEVEL") or "INFO",
        choices=_LOG_LEVELS,
        help="every service's log level (default PYTHONON_LOG_LEVEL, else INFO)",
    )
    migrate = commands.add_parser(
        "migrate",
        help="bring every service's database schema to the latest version, then exit "
        "(`up` does this too before the services start)",
    )
    migrate.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".data"),
        help="where the SQLite databases are when no --database-url is given (default .data)",
    )
    _add_database_url(migrate)
    migrate.add_argument(
        "--service",
        choices=migrations.DATABASE_SERVICES,
        help="migrate only this service's database (e.g. a Kubernetes Job, with --database-url or "
        "PYTHONON_DATABASE_URL naming that service's database)",
    )
    return parser


def _add_database_url(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--database-url",
        default=os.environ.get("PYTHONON_DATABASE_URL"),
        help="one SQLAlchemy URL for every service (default: SQLite files in the data directory; "
        "PYTHONON_DATABASE_URL also sets it, and keeps a password out of the process list)",
    )


def migrate(args: argparse.Namespace) -> int:
    """Migrate, print what was done per service; exit 1 (naming the service and why) on failure."""
    if args.database_url is not None and not is_database_url(args.database_url):
        # The URL is not echoed: it may carry a password.
        print("pyth-on: --database-url must be a sqlite:// or postgresql:// URL", file=sys.stderr)
        return 2
    services = (args.service,) if args.service else migrations.DATABASE_SERVICES
    try:
        urls = migrations.database_urls(args.data_dir, args.database_url, services)
        for service, url in urls.items():
            print(migrations.migrate_service(service, url).describe(), flush=True)
    except migrations.MigrationError as error:
        print(f"pyth-on: {error}", file=sys.stderr)
        return 1
    return 0


def up(config: MeshConfig) -> int:
    """Run the mesh until Ctrl-C or SIGTERM (exit 0) or until a process dies (exit 1)."""
    stopping = False

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        # The first signal interrupts whatever is running (start-up included); later ones must not
        # interrupt the orderly stop that follows.
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)

    def report(restart: Restart) -> None:
        print(f"pyth-on: {restart.describe()}", file=sys.stderr, flush=True)

    mesh = Mesh(config, on_restart=report)
    try:
        print(f"Starting Pyth-On (data in {mesh.layout.root}) ...", flush=True)
        mesh.start()
        print(f"Pyth-On is up at {mesh.url}", flush=True)
        print(f"Logs are in {mesh.layout.logs}. Press Ctrl-C to stop.", flush=True)
        ended = mesh.wait()
        stopping = True
        _name, description = ended or ("", "a process ended")
        print(f"pyth-on: {description}\nStopping the whole mesh.", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        stopping = True
        print("\nStopping Pyth-On ...", flush=True)
        return 0
    except (MeshError, migrations.MigrationError) as error:
        stopping = True
        print(f"pyth-on: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        stopping = True
        mesh.stop()
        print("Stopped.", flush=True)


# The client's commands (run, secrets, packages, zk, generate, audit, login) live in the SDK
# (sdk/python, import name pyth_on), which owns the same command name and hands `up` and `migrate`
# back here; whichever package's script is installed last, every command works.
_SERVER_COMMANDS = ("up", "migrate")
_CLIENT_CLI = "pyth_on.cli"


def _client_command(argv: Sequence[str]) -> int | None:
    """Hand a command that is not the server's to the SDK's command line, when it is installed."""
    if not argv or argv[0].startswith("-") or argv[0] in _SERVER_COMMANDS:
        return None
    try:
        installed = importlib.util.find_spec(_CLIENT_CLI) is not None
    except ModuleNotFoundError:
        installed = False
    if not installed:
        print(
            f"pyth-on: `{argv[0]}` is not a server command (up, migrate); the client's commands come "
            "with the pyth-on-client package: pip install ./sdk/python",
            file=sys.stderr,
        )
        return 2
    client_cli = importlib.import_module(_CLIENT_CLI)
    status: int = client_cli.main(list(argv))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pyth-on` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    delegated = _client_command(arguments)
    if delegated is not None:
        return delegated
    args = _parser().parse_args(arguments)
    if args.command == "migrate":
        return migrate(args)
    try:
        operator_settings(os.environ)  # refused variables are named before anything starts
        config = MeshConfig(
            port=args.port,
            data_dir=args.data_dir,
            database_url=args.database_url,
            log_level=args.log_level,
            executors=args.executors,
            service_env={"executor": {"PYTHONON_EXECUTOR_BACKEND": args.sandbox}},
        )
    except MeshError as error:
        print(f"pyth-on: {error}", file=sys.stderr)
        return 2
    return up(config)


if __name__ == "__main__":
    sys.exit(main())
