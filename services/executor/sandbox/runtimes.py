"""How each language's runtime is found on this host and started in a sandbox: the few host paths
it needs (mounted read-only), the command that starts its warm bootstrap, and how a run's payload is
encoded for that bootstrap. Which languages exist is said once, in languages.py.

Payloads are plain data, never a Python-specific serialisation, so that the sandbox's interpreter
need not be the executor's: for Python records a bootstrap parses with builtins only (see
`_records`), for JavaScript a JSON object (file contents in base64), for Bash a script. Each
travels as one frame, b"<decimal length>\n" + body (see `frame`)."""

from __future__ import annotations

import base64
import json
import os
import posixpath
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.executor.sandbox import bootstrap_python
from services.executor.sandbox.bootstrap_scripts import BASH_BOOTSTRAP, BASH_BOOTSTRAP_STDIN, NODE_BOOTSTRAP
from services.executor.sandbox.interface import WORKDIR, RunSpec, safe_relative_path

if TYPE_CHECKING:
    from services.executor.sandbox.languages import Language

# What a program finds in its environment besides the run's own variables.
SAFE_ENV = {
    "HOME": WORKDIR,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}

# Written by a bootstrap on stderr as the very last thing, when the payload asks for it (`end_token`):
# b"\0pythonon-exit <token> <status>\n". It tells the backend the program's exit status before the
# sandbox itself has finished tearing down (gVisor takes ~10 ms more); the backend strips it.
END_MARKER = b"\x00pythonon-exit "

# Shared libraries every runtime loads; kept as the host has them (directories or merged-/usr links).
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32")

# What a Bash script may call: coreutils and the handful of tools scripts commonly expect.
BASH_TOOLS = (
    "[", "arch", "b2sum", "base32", "base64", "basename", "basenc", "cat", "chmod", "cksum", "comm", "cp",
    "csplit", "cut", "date", "dd", "df", "dirname", "du", "echo", "env", "expand", "expr", "factor", "false",
    "fmt", "fold", "head", "id", "join", "link", "ln", "ls", "md5sum", "mkdir", "mkfifo", "mktemp", "mv",
    "nl", "nproc", "numfmt", "od", "paste", "pr", "printenv", "printf", "pwd", "readlink", "realpath", "rm",
    "rmdir", "seq", "sha1sum", "sha224sum", "sha256sum", "sha384sum", "sha512sum", "shred", "shuf", "sleep",
    "sort", "split", "stat", "sum", "sync", "tac", "tail", "tee", "test", "timeout", "touch", "tr", "true",
    "truncate", "tsort", "uname", "unexpand", "uniq", "unlink", "wc", "whoami", "yes",
    "bash", "sh", "grep", "egrep", "fgrep", "sed", "awk", "find", "xargs", "cmp", "diff", "gzip", "gunzip",
    "zcat", "tar", "fallocate", "getopt", "which", "kill", "ps", "bc",
)  # fmt: skip


@dataclass(frozen=True)
class Runtime:
    language: str
    main_file: str
    command: tuple[str, ...]  # inside the sandbox; the payload frame comes on fd 4
    command_stdin: tuple[str, ...]  # the same, the payload frame coming first on stdin (gVisor)
    binds: tuple[tuple[str, str], ...]  # (host path, sandbox path), read-only
    symlinks: tuple[tuple[str, str], ...]  # (target, link)
    path: str  # PATH inside
    # RLIMIT_AS is a sane memory fallback for Python and Bash, never for node (V8 reserves far
    # more address space than it uses).
    limit_address_space: bool
    encoder: Callable[[Runtime, RunSpec, Mapping[str, str], int, bool, str | None], bytes]

    def environment(self, spec: RunSpec) -> dict[str, str]:
        return {"PATH": self.path, **SAFE_ENV, **spec.env}

    def payload(
        self, spec: RunSpec, cpu_seconds: int, inline_private: bool = False, end_token: str | None = None
    ) -> bytes:
        """What the bootstrap reads (unframed); `cpu_seconds` lowers RLIMIT_CPU where the runtime
        can. With `inline_private`, the private input travels in the payload and the bootstrap puts it
        on fd 3 (for a sandbox that cannot be handed a pipe there). With `end_token`, the bootstrap
        ends with END_MARKER, the token and the exit status on stderr."""
        return self.encoder(self, spec, self.environment(spec), cpu_seconds, inline_private, end_token)


def frame(body: bytes) -> bytes:
    """One payload as the bootstraps read it: its length in decimal, a newline, the bytes."""
    return b"%d\n" % len(body) + body


def system_library_binds() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    binds, links = [], []
    for path in SYSTEM_LIBRARY_DIRS:
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append((path, path))
    return binds, links


def find_python(language: Language, executable: str | None, runtime_dir: Path) -> Runtime:
    candidates = (
        [executable]
        if executable
        else [
            os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"),
            os.path.join(sys.base_prefix, "bin", "python3"),
        ]
    )
    exe = next((Path(c).resolve() for c in candidates if c and os.access(c, os.X_OK)), None)
    if exe is None:
        raise LookupError(f"no Python interpreter at {', '.join(c for c in candidates if c)}")
    prefix = exe.parent.parent
    version = _python_version_dir(prefix)
    if version is None:
        raise LookupError(f"no standard library found under {prefix / 'lib'}")
    binds = [(str(exe), str(exe)), (str(prefix / "lib" / version), str(prefix / "lib" / version))]
    binds += [(str(p), str(p)) for p in sorted((prefix / "lib").glob(f"lib{version}*.so*")) if p.is_file()]
    symlinks = [(exe.name, str(exe.parent / name)) for name in ("python3", "python") if name != exe.name]
    bootstrap = Path(bootstrap_python.__file__).read_text()
    return Runtime(
        language=language.name,
        main_file=language.main_file,
        command=(str(exe), "-I", "-S", "-u", "-B", "-c", bootstrap),
        command_stdin=(str(exe), "-I", "-S", "-u", "-B", "-c", bootstrap, "stdin"),
        binds=tuple(binds),
        symlinks=tuple(symlinks),
        path=f"{exe.parent}:/usr/local/bin:/usr/bin:/bin",
        limit_address_space=True,
        encoder=_records,
    )


def _python_version_dir(prefix: Path) -> str | None:
    for candidate in sorted((prefix / "lib").glob("python3.*"), reverse=True):
        if (candidate / "os.py").is_file():
            return candidate.name
    return None


def find_node(language: Language, executable: str | None, runtime_dir: Path) -> Runtime:
    found = executable or shutil.which("node", path="/usr/local/bin:/usr/bin:/bin")
    if not found or not os.access(found, os.X_OK):
        raise LookupError("node is not installed")
    exe = Path(found).resolve()
    return Runtime(
        language=language.name,
        main_file=language.main_file,
        command=(str(exe), "-e", NODE_BOOTSTRAP),
        command_stdin=(str(exe), "-e", NODE_BOOTSTRAP, "stdin"),
        binds=((str(exe), str(exe)),),
        symlinks=(),
        path=f"{exe.parent}:/usr/local/bin:/usr/bin:/bin",
        limit_address_space=False,
        encoder=_node_payload,
    )


def find_bash(language: Language, executable: str | None, runtime_dir: Path) -> Runtime:
    bash = executable or shutil.which("bash", path="/usr/bin:/bin")
    if not bash or not os.access(bash, os.X_OK):
        raise LookupError("bash is not installed")
    toolbox = runtime_dir / "bash-tools"
    toolbox.mkdir(exist_ok=True)
    toolbox.chmod(0o755)  # not left to the umask: the sandbox's uid must be able to use the tools
    for tool in BASH_TOOLS:
        host = Path(bash) if tool == "bash" else shutil.which(tool, path="/usr/bin:/bin")
        if host is None:
            continue
        _link_or_copy(Path(host).resolve(), toolbox / tool)
    return Runtime(
        language=language.name,
        main_file=language.main_file,
        command=("/usr/bin/bash", "-c", BASH_BOOTSTRAP),
        command_stdin=("/usr/bin/bash", "-c", BASH_BOOTSTRAP_STDIN),
        binds=((str(toolbox), "/usr/bin"),),
        symlinks=(("usr/bin", "/bin"),),
        path="/usr/bin:/bin",
        limit_address_space=True,
        encoder=_bash_payload,
    )


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _files(spec: RunSpec) -> list[tuple[str, bytes]]:
    return [(safe_relative_path(name), bytes(data)) for name, data in spec.files.items()]


def _records(
    runtime: Runtime,
    spec: RunSpec,
    env: Mapping[str, str],
    cpu_seconds: int,
    inline_private: bool,
    end_token: str | None,
) -> bytes:
    """The Python bootstrap's payload: records, each b"<kind> <size>[ <size>]\n" and the fields."""
    parts: list[bytes] = []

    def record(kind: str, *fields: bytes) -> None:
        parts.append(" ".join([kind, *(str(len(f)) for f in fields)]).encode() + b"\n")
        parts.extend(fields)

    record("workdir", WORKDIR.encode())
    record("main", runtime.main_file.encode())
    record("code", spec.code.encode())
    record("cpu", str(cpu_seconds).encode())
    for name, value in env.items():
        record("env", name.encode(), value.encode())
    for name, data in _files(spec):
        record("file", name.encode(), data)
    if inline_private:
        record("private", bytes(spec.private_input))
    if end_token is not None:
        record("end", end_token.encode())
    return b"".join(parts)


def _json_payload(
    runtime: Runtime,
    spec: RunSpec,
    env: Mapping[str, str],
    cpu_seconds: int,
    inline_private: bool,
    end_token: str | None,
) -> bytes:
    """The JavaScript bootstrap's payload: one JSON object (node parses it natively)."""
    message: dict[str, object] = {
        "workdir": WORKDIR,
        "main": runtime.main_file,
        "code": spec.code,
        "env": dict(env),
        "files": {name: base64.b64encode(data).decode() for name, data in _files(spec)},
        "cpu_seconds": cpu_seconds,
    }
    if inline_private:
        message["private"] = base64.b64encode(spec.private_input).decode()
    if end_token is not None:
        message["end_token"] = end_token
    return json.dumps(message).encode()


def _node_payload(
    runtime: Runtime,
    spec: RunSpec,
    env: Mapping[str, str],
    cpu_seconds: int,
    inline_private: bool,
    end_token: str | None,
) -> bytes:
    if inline_private and spec.private_input:
        raise ValueError(
            "this backend cannot give a JavaScript program private input (node cannot dup2 it to fd 3)"
        )
    return _json_payload(runtime, spec, env, cpu_seconds, False, end_token)


def _bash_payload(
    runtime: Runtime,
    spec: RunSpec,
    env: Mapping[str, str],
    cpu_seconds: int,
    inline_private: bool,
    end_token: str | None,
) -> bytes:
    end = "__PYTHONON_END_OF_FILE__"  # cannot occur in base64
    lines = ["exec 4<&-", f"ulimit -t {cpu_seconds} 2>/dev/null", f"cd {_quote(WORKDIR)} || exit 70"]
    if inline_private:
        staged = "/tmp/.private-input"  # noqa: S108 - the sandbox's own tmpfs, unlinked at once
        lines += [
            f"base64 -d > {staged} <<'{end}' || exit 70",
            base64.encodebytes(spec.private_input).decode(),
            end,
        ]
        lines += [f"exec 3< {staged}", f"rm -f {staged}"]
    for name, data in [*_files(spec), (runtime.main_file, spec.code.encode())]:
        directory = posixpath.dirname(name)
        if directory:
            lines.append(f"mkdir -p -- {_quote(directory)} || exit 70")
        lines += [f"base64 -d > {_quote(name)} <<'{end}' || exit 70", base64.encodebytes(data).decode(), end]
    assignments = " ".join(_quote(f"{name}={value}") for name, value in env.items())
    main = posixpath.join(WORKDIR, runtime.main_file)
    program = f"/usr/bin/env -i -- {assignments} /usr/bin/bash {_quote(main)}"
    if end_token is None:
        lines.append(f"exec {program}")
    else:
        # The program as a child, so that this shell can say how it ended.
        lines.append(f"{program}; status=$?")
        lines.append(
            f'printf \'\\000pythonon-exit %s %d\\n\' {_quote(end_token)} "$status" >&2; exit "$status"'
        )
    return "\n".join(lines).encode() + b"\n"


_SHELL_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./,:=+@%-")


def _quote(value: str) -> str:
    """Bash ANSI-C quoting with every byte outside a small safe set escaped: any value, any bytes."""
    return "$'" + "".join(chr(b) if b in _SHELL_SAFE else f"\\x{b:02x}" for b in value.encode()) + "'"
