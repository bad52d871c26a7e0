"""The `pyth-on` command line of the SDK.

One command name serves both packages: `up` and `migrate` belong to the server (services.runner.cli)
and are handed to it when it is installed beside this package; the server's own `pyth-on` hands
every other command here. So whichever package's script is on PATH, every command works.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pyth_on import __version__
from pyth_on.client import Client
from pyth_on.config import ConfigError, config_path, remove_file, settings, write_file
from pyth_on.encryption import Kdf
from pyth_on.errors import ApiError, PythOnError
from pyth_on.models import ExecutionResult, OutputEvent, Package, ResultEvent

SERVER_COMMANDS = ("up", "migrate")
SERVER_MODULE = "services.runner.cli"
# The exit status of `run`, `zk run` and `generate --execute` when the API, not the program, failed
# (as `docker run` does), so that a program's own 1 or 2 is not mistaken for it.
API_FAILED = 125
LANGUAGE_OF_SUFFIX = {
    ".py": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".sh": "bash",
    ".bash": "bash",
}


class UsageError(Exception):
    pass


def _server_installed() -> bool:
    try:
        return importlib.util.find_spec(SERVER_MODULE) is not None
    except ModuleNotFoundError:
        return False


def _run_server(argv: Sequence[str]) -> int:
    if not _server_installed():
        print(
            f"pyth-on: `{argv[0]}` is a command of the Pyth-On server, which is not installed here "
            "(this is the client, pyth-on-client)",
            file=sys.stderr,
        )
        return 2
    from services.runner import cli as server_cli  # type: ignore[import-not-found,unused-ignore]

    try:
        result: int = server_cli.main(list(argv))
    except SystemExit as exit:  # argparse's --version, --help and usage errors
        return exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    return result


# Reading what must never be an argument.


def _read_secret(prompt: str, fd: int | None, *, from_stdin: bool = False, confirm: bool = False) -> str:
    """A password or secret value: from file descriptor `fd`, else from stdin when it is not a
    terminal and `from_stdin`, else from a hidden prompt. One trailing newline is dropped."""
    if fd is not None:
        with os.fdopen(fd, "r", encoding="utf-8", closefd=False) as source:
            return _one_line_end(source.read())
    if from_stdin and not sys.stdin.isatty():
        return _one_line_end(sys.stdin.read())
    if not _has_terminal():
        raise UsageError(
            f"no terminal to ask for it ({prompt.rstrip(': ')}): give --password-fd N, "
            "e.g. --password-fd 3 3<file"
        )
    try:
        value = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != value:
            raise UsageError("the two entries differ")
    except EOFError:
        raise UsageError("nothing was entered") from None
    return value


def _has_terminal() -> bool:
    """Whether getpass can ask without echoing: through the controlling terminal, or a terminal on
    stdin (without either it reads stdin with a warning, and fails at its end)."""
    try:
        with open("/dev/tty", "rb"):
            return True
    except OSError:
        return sys.stdin is not None and sys.stdin.isatty()


def _one_line_end(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


# Printing.


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""


def _exit_status(result: ExecutionResult) -> int:
    if result.timed_out:
        print("pyth-on: the run timed out", file=sys.stderr)
    if result.truncated:
        print("pyth-on: the output was cut at the size limit", file=sys.stderr)
    return result.exit_code if 0 <= result.exit_code <= 255 else 1


def _print_result(result: ExecutionResult) -> int:
    sys.stdout.write(result.output)
    sys.stdout.flush()
    sys.stderr.write(result.error)
    sys.stderr.flush()
    return _exit_status(result)


# Commands.


def _client() -> Client:
    current = settings()
    if not current.api_key:
        raise UsageError("no API key: set PYTHONON_API_KEY, or run `pyth-on login`")
    return Client(current.url, api_key=current.api_key)


def cmd_run(args: argparse.Namespace) -> int:
    code = _read_text(args.file)
    language = args.language or LANGUAGE_OF_SUFFIX.get(Path(args.file).suffix.lower())
    stdin = _read_text(args.stdin) if args.stdin is not None else None
    with _client() as client:
        options: dict[str, Any] = {
            "language": language,
            "stdin": stdin,
            "timeout": args.timeout,
            "env": _env(args.env),
            "secrets": _secrets(args),
        }
        if not args.stream:
            return _print_result(client.execute(code, **options))
        for event in client.stream(code, **options):
            if isinstance(event, OutputEvent):
                out = sys.stdout if event.stream == "stdout" else sys.stderr
                out.write(event.text)
                out.flush()
            elif isinstance(event, ResultEvent):
                return _exit_status(event.result)
    return API_FAILED


def _env(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise UsageError(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _secrets(args: argparse.Namespace) -> list[str] | None:
    if args.no_secrets:
        return []
    return list(args.secret) if args.secret else None


def cmd_secrets_set(args: argparse.Namespace) -> int:
    value = _read_secret(f"Value of {args.name}: ", None, from_stdin=True)
    with _client() as client:
        secret = client.secrets.put(args.name, value, description=args.description)
    print(f"{secret.name}: version {secret.version}")
    return 0


def cmd_secrets_list(_args: argparse.Namespace) -> int:
    with _client() as client:
        secrets = client.secrets.list()
    _table(
        [(s.name, str(s.version), _when(s.updated_at), s.description) for s in secrets],
        ("NAME", "VERSION", "UPDATED", "DESCRIPTION"),
    )
    return 0


def cmd_secrets_delete(args: argparse.Namespace) -> int:
    with _client() as client:
        for name in args.names:
            client.secrets.delete(name)
            print(f"deleted {name}")
    return 0


def _print_packages(packages: Sequence[Package]) -> None:
    _table(
        [(p.name, p.spec, p.version, p.status, p.reason) for p in packages],
        ("NAME", "SPEC", "VERSION", "STATUS", "REASON"),
    )


def _progress(out: TextIO) -> Callable[[list[Package]], None]:
    """Shows how far the build is: one line rewritten in place on a terminal, else a line per change."""
    started, last = time.monotonic(), [""]

    def show(packages: list[Package]) -> None:
        counts = {status: sum(p.status == status for p in packages) for status in ("ready", "failed")}
        waiting = len(packages) - counts["ready"] - counts["failed"]
        summary = f"{counts['ready']} of {len(packages)} ready"
        if counts["failed"]:
            summary += f", {counts['failed']} failed"
        if waiting:
            summary += f", {waiting} building"
        if out.isatty():
            out.write(f"\rbuilding the environment: {summary} ({time.monotonic() - started:.0f} s)\x1b[K")
            if not waiting:
                out.write("\n")
            out.flush()
        elif summary != last[0]:
            print(f"building the environment: {summary}", file=out, flush=True)
        last[0] = summary

    return show


def _settle(client: Client, args: argparse.Namespace) -> int:
    if args.no_wait:
        _print_packages(client.packages.list())
        return 0
    packages = client.packages.wait(timeout=args.wait_timeout, on_progress=_progress(sys.stderr))
    _print_packages(packages)
    return 1 if any(p.status == "failed" for p in packages) else 0


def cmd_packages_add(args: argparse.Namespace) -> int:
    with _client() as client:
        for spec in args.specs:
            client.packages.add(spec)
        return _settle(client, args)


def cmd_packages_set(args: argparse.Namespace) -> int:
    with _client() as client:
        client.packages.set(args.specs)
        return _settle(client, args)


def cmd_packages_remove(args: argparse.Namespace) -> int:
    with _client() as client:
        for name in args.names:
            client.packages.remove(name)
        return _settle(client, args)


def cmd_packages_list(_args: argparse.Namespace) -> int:
    with _client() as client:
        _print_packages(client.packages.list())
    return 0


def cmd_zk_put(args: argparse.Namespace) -> int:
    code = _read_text(args.file)
    language = args.language or LANGUAGE_OF_SUFFIX.get(Path(args.file).suffix.lower())
    password = _read_secret("Password: ", args.password_fd, confirm=True)
    kdf = Kdf(memory_kib=args.memory_kib, iterations=args.iterations)
    with _client() as client:
        stored = client.zk.put(args.name, client.zk.encrypt_local(code, password, kdf), language=language)
    print(f"{stored.name}: {stored.language}, {stored.size} bytes of ciphertext, sha256 {stored.sha256}")
    return 0


def cmd_zk_run(args: argparse.Namespace) -> int:
    stdin = _read_text(args.stdin) if args.stdin is not None else None
    password = _read_secret("Password: ", args.password_fd)
    with _client() as client:
        result = client.zk.run(
            args.name, password, stdin=stdin, timeout=args.timeout, env=_env(args.env), secrets=_secrets(args)
        )
    return _print_result(result)


def cmd_zk_list(_args: argparse.Namespace) -> int:
    with _client() as client:
        items = client.zk.list()
    _table(
        [(i.name, i.language, str(i.size), _when(i.updated_at), i.sha256) for i in items],
        ("NAME", "LANGUAGE", "SIZE", "UPDATED", "SHA256"),
    )
    return 0


def cmd_zk_delete(args: argparse.Namespace) -> int:
    with _client() as client:
        for name in args.names:
            client.zk.delete(name)
            print(f"deleted {name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    with _client() as client:
        generation = client.generate(
            args.prompt,
            language=args.language,
            execute=args.execute,
            timeout=args.timeout,
            install_packages=args.install_packages,
        )
    if not args.execute:
        sys.stdout.write(generation.code if generation.code.endswith("\n") else generation.code + "\n")
        if generation.packages:
            print(f"# needs packages: {' '.join(generation.packages)}", file=sys.stderr)
        return 0
    # The run's output is the result; the code and the explanation go to stderr for the reader.
    print(
        f"# {generation.language} code by {generation.model}:\n{generation.code.rstrip()}\n# output:",
        file=sys.stderr,
    )
    sys.stdout.write(generation.output)
    sys.stdout.flush()
    sys.stderr.write(generation.error)
    return generation.exit_code if 0 <= generation.exit_code <= 255 else 1


def cmd_audit(args: argparse.Namespace) -> int:
    with _client() as client:
        if args.verify:
            check = client.audit.verify()
            if check.valid:
                print(f"the chain is intact: {check.entries} entries, head {check.head_hash}")
                return 0
            print(f"the chain is BROKEN at entry {check.broken_at_sequence}: {check.message}")
            return 1
        shown = 0
        rows = []
        for entry in client.audit.list(
            action=args.action, since=args.since, until=args.until, page_size=args.page_size
        ):
            if args.json:
                print(json.dumps(entry.raw, sort_keys=True), flush=True)
            else:
                rows.append(
                    (str(entry.sequence), _when(entry.timestamp), entry.action, entry.resource, entry.outcome)
                )
            shown += 1
            if args.limit and shown >= args.limit:
                break
    if not args.json:
        _table(rows, ("SEQ", "TIME (UTC)", "ACTION", "RESOURCE", "OUTCOME"))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    current = settings()
    url = (args.url or os.environ.get("PYTHONON_URL") or current.url).rstrip("/")
    with Client(url, api_key="") as anonymous:
        if args.email:
            password = _read_secret(f"Password of {args.email}: ", args.password_fd)
            session = anonymous.login(args.email, password)
            api_key, email = session.api_key, session.user.email
        else:
            api_key = _read_secret("API key: ", args.password_fd, from_stdin=True).strip()
            email = ""
    with Client(url, api_key=api_key) as client:
        email = email or client.whoami().email  # the key is checked before it is stored
    path = write_file(url, api_key)
    print(f"logged in to {url} as {email}; the key is in {path} (readable by you only)")
    return 0


def cmd_logout(_args: argparse.Namespace) -> int:
    path = config_path()
    print(f"removed {path}" if remove_file(path) else f"no stored key ({path} does not exist)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyth-on",
        description="Pyth-On's command line: run code and manage secrets, packages, zero-knowledge "
        "code and the audit log. Server: PYTHONON_URL, key: PYTHONON_API_KEY (or `pyth-on login`).",
        epilog="`pyth-on up` and `pyth-on migrate` start and migrate the server itself, where the "
        "server package is installed.",
    )
    parser.add_argument("--version", action="store_true", help="print the versions and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        parent: Any, name: str, handler: Callable[[argparse.Namespace], int], help: str, program: bool = False
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler, api_failure=API_FAILED if program else 1)
        return sub

    def run_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--stdin", metavar="FILE", help="the program's standard input ('-': this one's)")
        sub.add_argument("--timeout", type=float, help="seconds (server default 10, at most 60)")
        sub.add_argument(
            "--env", action="append", metavar="NAME=VALUE", help="an environment variable (repeatable)"
        )
        group = sub.add_mutually_exclusive_group()
        group.add_argument(
            "--secret", action="append", metavar="NAME", help="inject only this secret (repeatable)"
        )
        group.add_argument("--no-secrets", action="store_true", help="inject none of your secrets")

    run = command(commands, "run", cmd_run, "run a file; exits with the program's exit status", program=True)
    run.add_argument("file", metavar="FILE", help="the code ('-' reads it from stdin)")
    run.add_argument("--language", "-l", help="python, javascript or bash (default: from the file's suffix)")
    run.add_argument("--stream", action="store_true", help="print the output as the program writes it")
    run_options(run)

    secrets = commands.add_parser("secrets", help="your secrets (values are write-only)")
    secrets_commands = secrets.add_subparsers(dest="action", metavar="ACTION", required=True)
    put = command(
        secrets_commands,
        "set",
        cmd_secrets_set,
        "store a secret; the value is read from stdin or a hidden prompt",
    )
    put.add_argument("name")
    put.add_argument("--description")
    command(secrets_commands, "list", cmd_secrets_list, "list your secrets' names")
    command(secrets_commands, "delete", cmd_secrets_delete, "delete secrets").add_argument("names", nargs="+")

    packages = commands.add_parser("packages", help="your Python packages")
    package_commands = packages.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, help, argument in (
        ("add", cmd_packages_add, "add packages (PEP 508 specs) and wait for the build", "specs"),
        ("set", cmd_packages_set, "replace the whole list and wait for the build", "specs"),
        ("remove", cmd_packages_remove, "remove packages and wait for the rebuild", "names"),
    ):
        sub = command(package_commands, name, handler, help)
        sub.add_argument(argument, nargs="+" if name != "set" else "*")
        sub.add_argument("--no-wait", action="store_true", help="do not wait for the build")
        sub.add_argument("--wait-timeout", type=float, default=600.0, help="seconds (default 600)")
    command(package_commands, "list", cmd_packages_list, "list your packages and their state")

    zk = commands.add_parser("zk", help="zero-knowledge code: encrypted here, readable only in its run")
    zk_commands = zk.add_subparsers(dest="action", metavar="ACTION", required=True)
    zk_put = command(zk_commands, "put", cmd_zk_put, "encrypt a file locally under a password and store it")
    zk_put.add_argument("name")
    zk_put.add_argument("file", metavar="FILE")
    zk_put.add_argument("--language", "-l", help="python, javascript or bash (default: from the suffix)")
    zk_put.add_argument(
        "--password-fd", type=int, metavar="N", help="read the password from file descriptor N"
    )
    zk_put.add_argument("--memory-kib", type=int, default=Kdf().memory_kib, help="Argon2id memory (KiB)")
    zk_put.add_argument("--iterations", type=int, default=Kdf().iterations, help="Argon2id iterations")
    zk_run = command(
        zk_commands, "run", cmd_zk_run, "run stored code; exits with its exit status", program=True
    )
    zk_run.add_argument("name")
    zk_run.add_argument(
        "--password-fd", type=int, metavar="N", help="read the password from file descriptor N"
    )
    run_options(zk_run)
    command(zk_commands, "list", cmd_zk_list, "list your stored code")
    command(zk_commands, "delete", cmd_zk_delete, "delete stored code").add_argument("names", nargs="+")

    generate = command(
        commands, "generate", cmd_generate, "have the model write code for a prompt", program=True
    )
    generate.add_argument("prompt")
    generate.add_argument("--execute", action="store_true", help="run it; exits with its exit status")
    generate.add_argument("--language", "-l")
    generate.add_argument("--timeout", type=float)
    generate.add_argument("--install-packages", action="store_true", help="add the packages it needs first")

    audit = command(commands, "audit", cmd_audit, "your audit log, newest first")
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain instead (exit 1 if broken)"
    )
    audit.add_argument("--limit", type=int, help="at most this many entries")
    audit.add_argument("--action", help="only this action, e.g. executor.execute")
    audit.add_argument("--since", help="RFC 3339 time")
    audit.add_argument("--until", help="RFC 3339 time")
    audit.add_argument("--page-size", type=int, help=argparse.SUPPRESS)
    audit.add_argument("--json", action="store_true", help="one JSON object per line, as the API prints it")

    login = command(commands, "login", cmd_login, "store the server's URL and your API key for this user")
    login.add_argument("--url", help="the server (default PYTHONON_URL, else the stored or local one)")
    login.add_argument("--email", help="log in with email and password instead of pasting an API key")
    login.add_argument("--password-fd", type=int, metavar="N", help="read the password (or key) from fd N")
    command(commands, "logout", cmd_logout, "forget the stored key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pyth-on` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in SERVER_COMMANDS:
        return _run_server(arguments)
    parser = _parser()
    args = parser.parse_args(arguments)
    if args.version:
        print(f"pyth-on-client {__version__}")
        if _server_installed():
            return _run_server(["--version"])
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result: int = args.handler(args)
        return result
    except ApiError as error:
        print(f"pyth-on: {error.message} (HTTP {error.status})", file=sys.stderr)
        return int(args.api_failure)
    except (PythOnError, ConfigError, UsageError, ValueError, TimeoutError) as error:
        print(f"pyth-on: {error}", file=sys.stderr)
        return int(args.api_failure) if isinstance(error, PythOnError | TimeoutError) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
