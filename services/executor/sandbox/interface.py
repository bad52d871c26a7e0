"""The sandbox contract every backend fulfils: what a run asks for, what it answers, the limits it
gets, and the two refusals a caller must handle (the backend cannot run here; it is saturated)."""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

MiB = 1024 * 1024

# Where a run's code and files live inside every sandbox; also its HOME.
WORKDIR = "/workspace"


# Told each piece of a run's output as the program writes it: the stream ("stdout" or "stderr") and
# its bytes, at most the run's output cap per stream in all. Pieces may split a UTF-8 character.
OutputListener = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Limits:
    """What one run may use (DESIGN §6 defaults)."""

    timeout_seconds: float = 10.0
    memory_bytes: int = 256 * MiB
    processes: int = 64
    output_bytes: int = 1 * MiB  # per stream
    file_bytes: int = 16 * MiB  # largest file a run may write
    tmp_bytes: int = 64 * MiB  # size of /tmp, and separately of the working directory
    cpus: float = 1.0  # CPU time per wall-clock second, in cores, whatever its threads and processes

    def __post_init__(self) -> None:
        if not (self.timeout_seconds > 0 and math.isfinite(self.timeout_seconds)):
            raise ValueError("timeout_seconds must be a positive number")
        if not (0.01 <= self.cpus and math.isfinite(self.cpus)):
            raise ValueError("cpus must be a number of at least 0.01")
        for name in ("memory_bytes", "processes", "output_bytes", "file_bytes", "tmp_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class RunSpec:
    """One run: the code, what it reads, and what it is allowed."""

    language: str
    code: str
    stdin: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # Extra files placed in the working directory (relative paths), e.g. encrypted payloads.
    files: Mapping[str, bytes] = field(default_factory=dict)
    # Delivered on fd 3 of the program, never in its environment or argv (e.g. a decryption password).
    private_input: bytes = b""
    # (host path, sandbox path) pairs bind-mounted read-only, e.g. the user's package environment.
    readonly_paths: Sequence[tuple[str, str]] = ()
    # Whom the run is for (e.g. a user id): runs at once and turns in line are shared fairly among owners.
    owner: str = ""


@dataclass(frozen=True)
class RunResult:
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: int
    timed_out: bool
    truncated: bool


class SandboxError(Exception):
    """Infrastructure trouble: the sandbox itself failed, not the program in it."""


class SandboxUnavailable(SandboxError):
    """This backend cannot run on this host; the message says why."""


class SandboxBusy(SandboxError):
    """Every run slot is taken and the expected wait (`retry_after`) is past the queue's bound."""

    def __init__(self, retry_after: float, message: str = "") -> None:
        self.retry_after = retry_after
        super().__init__(message or f"the sandbox is saturated; retry after {retry_after:g} s")


@runtime_checkable
class SandboxBackend(Protocol):
    name: str

    def languages(self) -> list[str]:
        """The languages whose runtimes exist on this host."""
        ...

    def enforced_limits(self) -> dict[str, bool]:
        """Which limits this host actually enforces (for /api/info)."""
        ...

    async def start(self) -> None:
        """Get ready to serve runs (e.g. fill the warm pool)."""
        ...

    async def run(self, spec: RunSpec, on_output: OutputListener | None = None) -> RunResult:
        """Run one program. Raises only for infrastructure trouble, never for what the program does.
        `on_output`, when given, hears the output as it is written, if the backend can tell it
        before the run ends (otherwise not at all: the result holds everything)."""
        ...

    def replenish(self) -> None:
        """Make up, in the background, for what runs took (e.g. warm sandboxes); called once a run's
        answer is on its way, so that the work does not compete with the run's own critical path."""
        ...

    async def close(self) -> None:
        """Kill everything still running and release what the backend holds."""
        ...


_ENV_NAME = re.compile(r"[^=\x00]+")


def validate_spec(spec: RunSpec, main_files: Mapping[str, str]) -> None:
    """Refuse a spec that no sandbox should be asked to run (a caller's mistake, not the program's).
    `main_files`: the languages available, each with the file its code is written to."""
    if spec.language not in main_files:
        raise ValueError(f"unsupported language {spec.language!r}; available: {', '.join(main_files)}")
    if "\x00" in spec.code:
        raise ValueError("code must not contain NUL characters")
    for name, value in spec.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if "\x00" in value:
            raise ValueError(f"environment variable {name} contains a NUL character")
    main = main_files[spec.language]
    total = len(spec.code.encode())
    for name, data in spec.files.items():
        clean = safe_relative_path(name)
        if clean == main:
            raise ValueError(f"a file named {main} would replace the code")
        total += len(data)
    if total > spec.limits.tmp_bytes:
        raise ValueError("code and files are larger than the working directory")
    for host, inside in spec.readonly_paths:
        if not posixpath.isabs(host) or not posixpath.isabs(inside):
            raise ValueError("readonly_paths must be absolute paths")
        if posixpath.normpath(inside) in ("/", "/proc", "/dev", "/tmp", WORKDIR):  # noqa: S108 - inside
            raise ValueError(f"cannot mount over {inside}")


def safe_relative_path(name: str) -> str:
    """A normalised relative path that stays inside the working directory, or ValueError."""
    if not name or "\x00" in name or name.startswith("/"):
        raise ValueError(f"invalid file name {name!r}")
    clean = posixpath.normpath(name)
    if clean in (".", "..") or clean.startswith("../"):
        raise ValueError(f"file name {name!r} leaves the working directory")
    return clean


def result_of(
    limits: Limits,
    *,
    stdout: bytes,
    stderr: bytes,
    exit_code: int,
    duration_seconds: float,
    timed_out: bool,
    overflowed: bool,
    memory_note: str | None = None,
) -> RunResult:
    """The RunResult every backend answers: a timeout is exit 137, and each limit that ended the run
    is said in a `[sandbox]` line appended to stderr."""
    notes = []
    if timed_out:
        exit_code = 137
        notes.append(f"execution timed out after {describe_seconds(limits.timeout_seconds)}")
    if overflowed:
        notes.append(
            f"output limit of {describe_bytes(limits.output_bytes)} per stream exceeded; the run was stopped"
        )
    elif memory_note:
        notes.append(memory_note)
    # Bytes that are not UTF-8 become U+FFFD (3 bytes each), so a stream within its byte cap can
    # grow up to threefold when decoded: cut it again to the cap, so an answer stays within bounds.
    output, output_cut = _decoded_within(stdout, limits.output_bytes)
    text, error_cut = _decoded_within(stderr, limits.output_bytes)
    for name, cut in (("stdout", output_cut), ("stderr", error_cut)):
        if cut:
            notes.append(
                f"{name} held bytes that are not UTF-8; each was replaced by U+FFFD and the text cut to "
                f"{describe_bytes(limits.output_bytes)}"
            )
    if notes:
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(f"[sandbox] {note}\n" for note in notes)
    return RunResult(
        stdout=output,
        stderr=text,
        exit_code=exit_code,
        duration_ms=round(duration_seconds * 1000),
        timed_out=timed_out,
        truncated=overflowed or output_cut or error_cut,
    )


def _decoded_within(data: bytes, limit: int) -> tuple[str, bool]:
    """`data` as text (invalid UTF-8 replaced), at most `limit` bytes once encoded, cut at a
    character boundary; and whether it was cut."""
    text = data.decode("utf-8", errors="replace")
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text, False
    return encoded[:limit].decode("utf-8", errors="ignore"), True


def describe_bytes(size: int) -> str:
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    if size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} bytes"


def describe_seconds(seconds: float) -> str:
    return f"{seconds:g} s"
