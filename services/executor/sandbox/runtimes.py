"""How each language's runtime is found on this host and started in a sandbox: the few host paths
it needs (mounted read-only), the command that starts its warm bootstrap, and how a run's payload is
encoded for that bootstrap. Which languages exist is said once, in languages.py.

Payloads are plain data, never a Python-specific serialisation, so that the sandbox's interpreter
need not be the executor's: for Python records a bootstrap parses with builtins only (see
`_records`), for JavaScript a JSON object (file contents in base64), for Bash a script. Each
travels as one frame, b"<decimal length>\n" + body (see `frame`)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import posixpath
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.executor.sandbox import bootstrap_python, elf
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
# sandbox itself has finished tearing down (gVisor takes ~10 ms more, bwrap's namespaces 1.4-2.7 ms);
# the backend strips it.
END_MARKER = b"\x00pythonon-exit "

# Top-level library directories: where they are merged-/usr links on the host, the sandbox has the
# same links (what is bound under them is resolved per runtime: see `linked_libraries`).
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32")
# What ordinary programs expect besides their runtime, bound for every language when the host has it:
# the time-zone database, and the C.UTF-8 locale (LANG's; without it Bash counts bytes, not characters).
TIME_ZONES = "/usr/share/zoneinfo"
COMMON_DIRECTORIES = (TIME_ZONES, "/usr/lib/locale/C.utf8")

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


def end_token() -> tuple[str, bytes]:
    """A run's end token, and the marker its bootstrap's last stderr line starts with (the exit
    status follows): a program cannot forge a marker it does not know the token of."""
    token = os.urandom(8).hex()
    return token, END_MARKER + token.encode() + b" "


def frame(body: bytes) -> bytes:
    """One payload as the bootstraps read it: its length in decimal, a newline, the bytes."""
    return b"%d\n" % len(body) + body


def system_library_links() -> list[tuple[str, str]]:
    """(target, link) of the host's merged-/usr links (/lib -> usr/lib...), kept in the sandbox so
    that the paths binaries were linked with (/lib64/ld-linux-x86-64.so.2) lead where they do here."""
    return [(os.readlink(path), path) for path in SYSTEM_LIBRARY_DIRS if os.path.islink(path)]


_LINKED: dict[tuple[str, float], frozenset[str]] = {}
LDD_BATCH = 32
# What glibc itself loads while a program runs, so no ldd lists it: libgcc_s, for unwinding a
# thread that ends with pthread_exit or is cancelled (Argon2id with parallelism above 1 does; without
# it the program aborts: "libgcc_s.so.1 must be installed for pthread_exit to work").
LOADED_BY_LIBC = ("libgcc_s.so.1",)


def linked_libraries(files: Iterable[str]) -> list[tuple[str, str]]:
    """(host file, sandbox path) binds of the shared libraries that `files` (executables and
    shared objects) load at start-up, the dynamic loader included, as the host's loader resolves
    them (ldd): the sandbox holds those instead of all of the host's /usr/lib. Each path is written
    without merged-/usr links in its directory, and bound to the file it finally names."""
    # Each file by its path and modification time (a file replaced since is asked about again).
    wanted = [
        (path, os.path.getmtime(path))
        for path in sorted({os.path.realpath(f) for f in files if os.path.isfile(f)})
    ]
    # Files alike in what decides their libraries (elf.linkage) share one answer of the loader:
    # some 300 files at an executor's start (Bash's tools, Python's extensions) make ~40 groups.
    groups: dict[object, list[tuple[str, float]]] = {}
    for stamped in wanted:
        if stamped in _LINKED:
            continue
        try:
            key: object = elf.linkage(stamped[0])
        except elf.NotElf:
            _LINKED[stamped] = frozenset()
            continue
        except (OSError, ValueError):
            key = stamped  # the loader is asked about this file alone
        groups.setdefault(key, []).append(stamped)
    asked = [members[0][0] for members in groups.values()]
    # ldd runs the loader once per file (~5 ms each): batches in parallel, one per core, since an
    # executor's start waits for them.
    batches = [asked[start : start + LDD_BATCH] for start in range(0, len(asked), LDD_BATCH)]
    found: dict[str, frozenset[str]] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(batches), os.cpu_count() or 1))) as pool:
        for answer in pool.map(_ldd, batches):
            found.update(answer)
    for members in groups.values():
        for stamped in members:
            _LINKED[stamped] = found.get(members[0][0], frozenset())
    libraries = set().union(*(_LINKED[stamped] for stamped in wanted))
    for libc in [library for library in libraries if os.path.basename(library) == "libc.so.6"]:
        for name in LOADED_BY_LIBC:
            beside = os.path.join(os.path.dirname(libc), name)
            if os.path.isfile(beside):
                libraries.add(beside)
    binds = []
    for library in sorted(libraries):
        inside = os.path.join(os.path.realpath(os.path.dirname(library)), os.path.basename(library))
        binds.append((os.path.realpath(library), inside))
    return binds


def _ldd(files: list[str]) -> dict[str, frozenset[str]]:
    """file -> the absolute paths of the libraries it loads (ldd's "=> /path" and the loader)."""
    ldd = shutil.which("ldd", path="/usr/bin:/bin")
    if ldd is None:
        raise LookupError("ldd is not installed: the sandbox cannot tell which libraries a runtime needs")
    answer = subprocess.run(  # noqa: S603 - our own files, no shell
        [ldd, *files], capture_output=True, text=True, timeout=60, env={"LC_ALL": "C"}, check=False
    )
    found: dict[str, set[str]] = {}
    current = files[0] if len(files) == 1 else None
    for line in answer.stdout.splitlines():
        if not line.startswith(("\t", " ")) and line.endswith(":"):
            current = line[:-1]
            continue
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0] if words else ""
        if current is not None and path.startswith("/"):
            found.setdefault(current, set()).add(path)
    return {path: frozenset(libraries) for path, libraries in found.items()}


def unique_binds(binds: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Binds without a second one at the same place inside (the first wins)."""
    seen: dict[str, str] = {}
    for host, inside in binds:
        seen.setdefault(inside, host)
    return [(host, inside) for inside, host in seen.items()]


def common_binds() -> list[tuple[str, str]]:
    """What every language's sandbox holds besides its runtime (COMMON_DIRECTORIES)."""
    return [(path, path) for path in COMMON_DIRECTORIES if os.path.isdir(path)]


# Python's extension modules whose libraries the sandbox does not hold (importing them fails).
NO_DISPLAY_EXTENSIONS = ("_tkinter",)


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
    # The extension modules are loaded later, but what they link must be there too; all but Tk's
    # (a sandbox has no display, and its 16 X11, font and image libraries were a third of the
    # root's mounts, each costing every sandbox start a pass over its mount table).
    extensions = sorted(
        str(p)
        for p in (prefix / "lib" / version / "lib-dynload").glob("*.so")
        if not p.name.startswith(NO_DISPLAY_EXTENSIONS)
    )
    binds += linked_libraries([str(exe), *extensions])
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
        binds=((str(exe), str(exe)), *linked_libraries([str(exe)])),
        symlinks=(),
        path=f"{exe.parent}:/usr/local/bin:/usr/bin:/bin",
        limit_address_space=False,
        encoder=_node_payload,
    )


def find_bash(language: Language, executable: str | None, runtime_dir: Path) -> Runtime:
    """Bash with the usual tools in /usr/bin (each bound from the host on its own, with the
    libraries they link), and `python3` and `node` there too when the host has them."""
    bash = executable or shutil.which("bash", path="/usr/bin:/bin")
    if not bash or not os.access(bash, os.X_OK):
        raise LookupError("bash is not installed")
    binds: list[tuple[str, str]] = []
    symlinks: list[tuple[str, str]] = [("usr/bin", "/bin")]
    for tool in BASH_TOOLS:
        host = Path(bash) if tool == "bash" else shutil.which(tool, path="/usr/bin:/bin")
        if host is not None:
            binds.append((str(Path(host).resolve()), f"/usr/bin/{tool}"))
    binds += linked_libraries(host for host, _ in binds)
    for other, names in (("python", ("python3", "python")), ("javascript", ("node", "nodejs"))):
        runtime = _other_runtime(other, runtime_dir)
        if runtime is None:
            continue
        binds += [bind for bind in runtime.binds if bind not in binds]
        symlinks += [(runtime.command[0], f"/usr/bin/{name}") for name in names]
    taken = {inside for _, inside in binds}
    symlinks = [(target, link) for target, link in symlinks if link not in taken]
    return Runtime(
        language=language.name,
        main_file=language.main_file,
        command=("/usr/bin/bash", "-c", BASH_BOOTSTRAP),
        command_stdin=("/usr/bin/bash", "-c", BASH_BOOTSTRAP_STDIN),
        binds=tuple(binds),
        symlinks=tuple(symlinks),
        path="/usr/bin:/bin",
        limit_address_space=True,
        encoder=_bash_payload,
    )


def _other_runtime(name: str, runtime_dir: Path) -> Runtime | None:
    """Another language's runtime, for Bash scripts to call; None when the host lacks it."""
    from services.executor.sandbox.languages import LANGUAGES

    try:
        return LANGUAGES[name].find_runtime(LANGUAGES[name], None, runtime_dir)
    except LookupError:
        return None


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
