"""One sandbox process seen from the outside: spawned with exactly the file descriptors it should
have, fed its payload and input through pipes, its output captured up to a cap, its exit observed
through a pidfd — all on the event loop, without threads or a child watcher.

File descriptors inside the sandbox:
  0 stdin · 1 stdout · 2 stderr · 3 private input · 4 payload (closed by the bootstrap once read)
  · 5 ready signal (the bootstrap writes "R" when it waits for the payload) · 6 seccomp filter for
  bwrap, when there is one (bwrap consumes it).

A sandbox that gets nothing but stdio (gVisor) says "R" on stdout instead and takes its payload first
on stdin. Either may end its stderr with an end marker (runtimes.END_MARKER) giving the exit status
before the sandbox has finished tearing down."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PRIVATE_FD = 3
PAYLOAD_FD = 4
READY_FD = 5
SECCOMP_FD = 6

_CHUNK = 64 * 1024
# The exit status that ends a run's stderr, after its end marker (compiled once: a pattern made of
# each run's own marker cost a compilation on every run's path, 72 us alone by timeit and about
# 0.8 ms a run of the executor's time by py-spy on a slow machine).
_STATUS_AT_END = re.compile(rb"(\d{1,3})\n\Z")


# Moves itself into each cgroup named (by writing 0 to its cgroup.procs) and then becomes the
# command, started from the directory given: so that the sandbox's every process, from its very
# first, is in the sandbox's cgroup and dies with it (a process started elsewhere and moved later
# could fork before the move).
_ENTER_CGROUPS = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 125; shift; n=$((n - 1)); done; '
    'cd "$1" || exit 125; shift; exec "$@"'
)


def spawn(
    argv: Sequence[str],
    seccomp_program: bytes | None = None,
    owner: int | None = None,
    cgroup_procs: Sequence[str] = (),
    inputs: Mapping[int, bytes] | None = None,
    from_directory: bool = False,
) -> SandboxProcess:
    """Start argv (bwrap or runsc) with a clean environment and the descriptors above. `owner` is
    the uid the program will run as, given the payload pipe so that it may reopen it
    (Bash reads it through /dev/fd/4). `cgroup_procs`: cgroup.procs files the process enters before
    it runs argv. `inputs`: more descriptors (above SECCOMP_FD), each a pipe holding the bytes given
    (small: they must fit in a pipe's buffer), e.g. files bwrap copies into the sandbox.
    `from_directory`: the program starts in its own directory as ./<name>, so that its argv[0]
    names no directory (bwrap's command line is the sandbox's /proc/1/cmdline, which every process
    in it can read) and its working directory is where it lies."""
    if cgroup_procs or from_directory:
        # With its trailing "/": the shell names the directory as a reap's markers do, from its
        # first instant, before it has entered its cgroups or moved there.
        directory = os.path.dirname(argv[0]) + "/" if from_directory else "/"
        shown = f"./{os.path.basename(argv[0])}" if from_directory else argv[0]
        argv = [
            "/bin/sh", "-c", _ENTER_CGROUPS, "sh", str(len(cgroup_procs)), *cgroup_procs, directory,
            shown, *argv[1:],
        ]  # fmt: skip
    executable = argv[0]
    opened: list[int] = []

    def pipe() -> tuple[int, int]:
        read, write = os.pipe2(os.O_CLOEXEC)
        opened.extend((read, write))
        return read, write

    try:
        stdin_r, stdin_w = pipe()
        stdout_r, stdout_w = pipe()
        stderr_r, stderr_w = pipe()
        private_r, private_w = pipe()
        payload_r, payload_w = pipe()
        if owner is not None:
            os.fchown(payload_r, owner, owner)
        ready_r, ready_w = pipe()
        child = {
            0: stdin_r,
            1: stdout_w,
            2: stderr_w,
            PRIVATE_FD: private_r,
            PAYLOAD_FD: payload_r,
            READY_FD: ready_w,
        }
        if seccomp_program is not None:
            seccomp_r, seccomp_w = pipe()
            os.write(seccomp_w, seccomp_program)  # small enough for the pipe buffer
            child[SECCOMP_FD] = seccomp_r
        for target, data in (inputs or {}).items():
            if target <= SECCOMP_FD:
                raise ValueError(f"descriptor {target} is taken")
            data_r, data_w = pipe()
            os.write(data_w, data)
            child[target] = data_r
        # Sources numbered above every target, so one dup2 cannot clobber another's source.
        highest = max(child)
        sources = {target: _above(fd, highest + 1, opened) for target, fd in child.items()}
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in sources.items()]
        # Then close what else would leak, except the descriptors just placed.
        placed = set(sources.values()) | set(child)
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds(exclude=placed)]
        pid = os.posix_spawn(executable, list(argv), {}, file_actions=actions, setsid=True)
    except BaseException:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    parent_ends = {stdin_w, stdout_r, stderr_r, private_w, payload_w, ready_r}
    for fd in opened:
        if fd not in parent_ends:
            os.close(fd)
    for fd in parent_ends:
        os.set_blocking(fd, False)
    return SandboxProcess(pid, stdin_w, stdout_r, stderr_r, private_w, payload_w, ready_r)


def _above(fd: int, minimum: int, opened: list[int]) -> int:
    if fd >= minimum:
        return fd
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)
    opened.append(high)
    return high


def _inheritable_fds(exclude: set[int]) -> list[int]:
    """Descriptors of this process that would leak into a child (opened without O_CLOEXEC)."""
    leaked = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in exclude:
                with contextlib.suppress(OSError):
                    if os.get_inheritable(fd):
                        leaked.append(fd)
    return leaked


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_seconds: float
    timed_out: bool
    overflowed: bool  # an output stream passed its cap


class PayloadRefused(Exception):
    """The sandbox closed its payload pipe before taking the whole payload: its bootstrap died."""


class SandboxProcess:
    def __init__(
        self,
        pid: int,
        stdin_w: int,
        stdout_r: int,
        stderr_r: int,
        private_w: int,
        payload_w: int,
        ready_r: int,
    ) -> None:
        self.pid = pid
        # Each is None once handed on or closed.
        self._stdin_w: int | None = stdin_w
        self._private_w: int | None = private_w
        self._payload_w: int | None = payload_w
        self._stdout_r: int | None = stdout_r
        self._stderr_r: int | None = stderr_r
        self._ready_r: int | None = ready_r
        self._loop = asyncio.get_running_loop()
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    # -- life cycle -------------------------------------------------------------------------

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = -1  # reaped by someone else: the exit status is lost
        else:
            if pid == 0:
                return
        self._close_pidfd()
        code = os.waitstatus_to_exitcode(status) if status != -1 else 255
        self.returncode = 128 - code if code < 0 else code
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def kill(self, *inner_pids: int) -> None:
        """SIGKILL the sandbox: its pid-namespace init first (the kernel then kills every process
        in the namespace), then every process below the outer one, then its process group (while
        bwrap sets a sandbox up, its child is still in the group: killed alone, the outer process
        would leave that child waiting forever for a word from its parent), then the outer one."""
        if self.returncode is not None:
            return
        for pid in (*inner_pids, *descendants_of(self.pid)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        for name in ("_stdin_w", "_private_w", "_payload_w", "_stdout_r", "_stderr_r", "_ready_r"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(fd)
                    self._loop.remove_writer(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    async def wait_ready(self, timeout: float, on_stdout: bool = False) -> bool:
        """True once the bootstrap says it is waiting for the payload; False if it never will.
        `on_stdout`: the signal is the first byte of stdout, not a byte on the ready pipe."""
        assert self._ready_r is not None and self._stdout_r is not None
        ready: asyncio.Future[bool] = self._loop.create_future()
        fd = self._stdout_r if on_stdout else self._ready_r

        def on_readable() -> None:
            try:
                data = os.read(fd, 1)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self._loop.remove_reader(fd)
            if not ready.done():
                ready.set_result(data == b"R")

        self._loop.add_reader(fd, on_readable)
        try:
            return await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(fd)
            os.close(self._ready_r)
            self._ready_r = None

    def read_available_stderr(self, limit: int = 4096) -> bytes:
        """What the process has written to stderr so far (bwrap's own error messages)."""
        if self._stderr_r is None:
            return b""
        try:
            return os.read(self._stderr_r, limit)
        except OSError:
            return b""

    # -- one run ----------------------------------------------------------------------------

    async def execute(
        self,
        payload: bytes,
        stdin: bytes,
        private_input: bytes,
        timeout: float,
        output_cap: int,
        kill: Callable[[], None],
        end_marker: bytes | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> Outcome:
        """Send the payload, then feed input and collect output until the process exits (or its
        stderr ends with `end_marker` and a status: see runtimes.END_MARKER), the timeout passes,
        or an output stream passes `output_cap` (then the sandbox is killed). `on_output` hears
        each stream's kept bytes as they arrive (stderr's last bytes, where an end marker may be,
        only once more follows: the Outcome has them)."""
        assert self._stdout_r is not None and self._stderr_r is not None
        overflowed = False

        def overflow() -> None:
            nonlocal overflowed
            overflowed = True
            kill()

        def listener(stream: str) -> Callable[[bytes], None] | None:
            return None if on_output is None else lambda data: on_output(stream, data)

        stdout = _Capture(self._loop, self._stdout_r, output_cap, overflow, on_data=listener("stdout"))
        stderr = _Capture(
            self._loop, self._stderr_r, output_cap, overflow, end_marker, on_data=listener("stderr")
        )
        started = self._loop.time()
        sent = _Feeder(self._loop, self._payload_w, payload)
        self._payload_w = None
        feeders = [
            _Feeder(self._loop, self._stdin_w, stdin),
            _Feeder(self._loop, self._private_w, private_input),
        ]
        self._stdin_w = self._private_w = None
        timed_out = False
        try:
            try:
                # The bootstrap reads the whole payload before any of the program runs, so a
                # refusal is the sandbox failing, never the program.
                if not await asyncio.wait_for(sent.done, timeout):
                    kill()
                    raise PayloadRefused()
                finished = {self.exited, stderr.ended}
                remaining = max(0.0, started + timeout - self._loop.time())
                if not (await asyncio.wait(finished, timeout=remaining, return_when=asyncio.FIRST_COMPLETED))[
                    0
                ]:
                    raise TimeoutError
            except TimeoutError:
                timed_out = True
                kill()
                await asyncio.wait_for(asyncio.shield(self.exited), 10)
            ended = self._loop.time()
            if stderr.ended.done() and not timed_out:
                exit_code = stderr.ended.result()
                # The program wrote its output before the marker: all of it is in the pipe now.
                stdout.drain()
            else:
                # Every holder of the output pipes is gone once the sandbox's init has exited.
                await asyncio.wait({stdout.eof, stderr.eof}, timeout=2)
                assert self.returncode is not None
                exit_code = self.returncode
        finally:
            for feeder in (sent, *feeders):
                feeder.stop()
            stdout.stop()
            stderr.stop()
            self._stdout_r = self._stderr_r = None
        return Outcome(
            stdout=bytes(stdout.data),
            stderr=bytes(stderr.data),
            exit_code=exit_code,
            duration_seconds=ended - started,
            timed_out=timed_out,
            overflowed=overflowed,
        )


class _Capture:
    """Reads one output pipe into memory up to a cap; past it, reports once and discards. With an
    end marker, `ended` gets the status once the stream ends with the marker (which is stripped).
    `on_data` hears the kept bytes as they arrive, less a tail that could be the start of the
    marker, from a NUL on (that tail is heard only once more follows)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        cap: int,
        on_overflow: Callable[[], None],
        end_marker: bytes | None = None,
        on_data: Callable[[bytes], None] | None = None,
    ) -> None:
        self._loop, self._fd, self._cap, self._on_overflow = loop, fd, cap, on_overflow
        self._on_data = on_data
        self._told = 0  # bytes of `data` already given to on_data
        # The marker (which ends with a space), a status of up to 3 digits and a newline.
        self._held_back = len(end_marker) + 5 if end_marker else 0
        self.data = bytearray()
        self.overflowed = False
        self.eof: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[int] = loop.create_future()
        self._end_marker = end_marker
        self._tail = b""  # the stream's last bytes, uncapped, where the marker would be
        self._total = 0
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._fd)
            if not self.eof.done():
                self.eof.set_result(None)
            return
        self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        self._total += len(chunk)
        room = self._cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        try:
            if self._end_marker is not None and not self.ended.done():
                self._tail = (self._tail + chunk)[-256:]
                status = _STATUS_AT_END.search(self._tail)
                if status and self._tail.endswith(self._end_marker, 0, status.start()):
                    content = self._total - (len(self._tail) - status.start() + len(self._end_marker))
                    del self.data[content:]
                    self.ended.set_result(int(status[1]))
                    self._held_back = 0  # the marker is gone: what is left is the program's
                    if content <= self._cap:
                        return
            if self._total > self._cap and not self.overflowed:
                self.overflowed = True
                self._on_overflow()
        finally:
            self._tell()

    def _tell(self) -> None:
        if self._on_data is None:
            return
        told_up_to = len(self.data) - self._marker_start()
        if told_up_to > self._told:
            piece = bytes(self.data[self._told : told_up_to])
            self._told = told_up_to
            self._on_data(piece)

    def _marker_start(self) -> int:
        """How many of the last kept bytes may be the beginning of the end marker (from its NUL on):
        those are told only once more follows. Output without a NUL near its end is told at once."""
        if not self._held_back:
            return 0
        window = self.data[-self._held_back :]
        start = window.rfind(b"\0")
        return 0 if start < 0 else len(window) - start

    def drain(self) -> None:
        """Read, without waiting, what the pipe holds now."""
        while not self.eof.done():
            try:
                chunk = os.read(self._fd, _CHUNK)
            except OSError:
                return
            if not chunk:
                return
            self._take(chunk)

    def stop(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if not self.eof.done():
            self.eof.set_result(None)


class _Feeder:
    """Writes bytes into a non-blocking pipe as the reader takes them, then closes it.
    `done` says whether everything was written (False when the reader went away first)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None, data: bytes) -> None:
        self._loop, self._fd = loop, fd
        self._view = memoryview(data)
        self.done: asyncio.Future[bool] = loop.create_future()
        if fd is None:
            self.done.set_result(False)
        elif not data:
            self._finish(True)
        else:
            self._write()
            if not self.done.done():
                loop.add_writer(fd, self._write)

    def _write(self) -> None:
        assert self._fd is not None
        try:
            written = os.write(self._fd, self._view[:_CHUNK])
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.EBADF):
                raise
            self._finish(False)
            return
        self._view = self._view[written:]
        if not self._view:
            self._finish(True)

    def _finish(self, complete: bool) -> None:
        if self._fd is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self.done.done():
            self.done.set_result(complete)

    def stop(self) -> None:
        self._finish(False)


def descendants_of(pid: int) -> list[int]:
    """Every process below `pid`, children before grandchildren."""
    found: list[int] = []
    pending = [pid]
    while pending:
        children = children_of(pending.pop())
        found += children
        pending += children
    return found


def children_of(pid: int) -> list[int]:
    """The direct children of a process, from /proc (CONFIG_PROC_CHILDREN) or, failing that, a scan."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        pass
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(name))
    return found
