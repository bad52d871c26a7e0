"""The runner of a sandbox pod (the kubernetes backend): the sandbox image's entry point.

It pulls its one run from the executor replica that made the pod (SandboxRunnerService.Claim, with
the pod's one-time claim token), runs the program in the working directory within the run's limits,
and pushes the result back (Report, with the report token Claim answered). Nothing of the run was
ever in the pod's spec. The claim token is read from the environment and dropped before anything
of the user's exists; once claimed it is worthless (see docs/architecture.md, "Sandbox pods").

The pod's own limits (memory, CPU, /tmp's size, the deadline) are Kubernetes' and gVisor's; this
runner adds what a process can do for itself: the wall-clock timeout, the output cap, the process
and file-size rlimits, a clean environment, the private input on fd 3.

Exit status: 0 after a report (or when retired unused), 3 when the executor refused the claim,
4 when the executor could not be reached."""

from __future__ import annotations

import argparse
import ctypes
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor.sandbox.interface import WORKDIR, safe_relative_path
from services.executor.sandbox.runtimes import SAFE_ENV

CLAIM_TOKEN_VARIABLE = "PYTHONON_SANDBOX_CLAIM_TOKEN"
PRIVATE_INPUT_FD = 3
# What the program finds in PATH (the sandbox image's runtimes).
PROGRAM_PATH = "/usr/local/bin:/usr/bin:/bin"
# A claim may wait as long as the pod lives (a warm pod waits for a run); the pod's deadline ends it.
CLAIM_WAIT_SECONDS = 24 * 3600
CONNECT_SECONDS = 30.0
REPORT_SECONDS = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# language -> (interpreter, main file). The interpreter is looked up in PATH inside the pod.
PROGRAMS: Mapping[str, tuple[str, str]] = {
    "python": ("python3", "main.py"),
    "javascript": ("node", "main.js"),
    "bash": ("bash", "main.sh"),
}

# Runs in a fresh interpreter between fork and the program (the runner has gRPC's threads, so no
# preexec_fn): sets the rlimits, puts the private input on fd 3, then becomes the program.
_LAUNCHER = """
import os, resource, sys
fd, nproc, fsize, cpu = (int(value) for value in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.execvp(sys.argv[5], sys.argv[5:])
"""


@dataclass(frozen=True)
class Outcome:
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_seconds: float
    timed_out: bool
    overflowed: bool


def undumpable() -> None:
    """The program runs under the runner's own uid: without this it could read the runner's memory
    (/proc/<pid>/mem) or trace it, and find the report token."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


def place_files(workdir: Path, run: executor_pb2.ClaimResponse) -> list[str]:
    """Write the code and the run's files into the working directory; the program's argv."""
    interpreter, main = PROGRAMS[run.language]
    for name, data in run.files.items():
        path = workdir / safe_relative_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (workdir / main).write_text(run.code)
    return [interpreter, str(workdir / main)]


def execute(argv: Sequence[str], run: executor_pb2.ClaimResponse, workdir: Path) -> Outcome:
    """Run the program to its end, its timeout or its output limit; every process it started dies
    with it (its own session, killed as a group)."""
    limits = run.limits
    env = {"PATH": PROGRAM_PATH, **SAFE_ENV, "HOME": str(workdir), **run.env}
    # The program runs under the runner's own uid, so the pipes' modes say how it may reopen them
    # through /proc/self/fd (/dev/stdin, /dev/stderr): inputs for reading, outputs for writing,
    # never its own output for reading (where it would hang on itself).
    pipes = [os.pipe() for _ in range(4)]
    for (read, _), mode in zip(pipes, (0o400, 0o200, 0o200, 0o400), strict=True):
        os.fchmod(read, mode)  # the two ends share one inode
    (stdin_read, stdin_write), (out_read, out_write), (err_read, err_write), (private_read, private_write) = (
        pipes
    )
    launcher = [
        sys.executable,
        "-S",
        "-c",
        _LAUNCHER,
        str(private_read),
        str(max(limits.processes, 1)),
        str(max(limits.file_bytes, 1)),
        str(int(limits.timeout_seconds) + 1),
        *argv,
    ]
    started = time.monotonic()
    try:
        process = subprocess.Popen(  # noqa: S603 - the program is what this pod exists to run
            launcher,
            stdin=stdin_read,
            stdout=out_write,
            stderr=err_write,
            pass_fds=(private_read,),
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    finally:
        for fd in (stdin_read, out_write, err_write, private_read):
            os.close(fd)
    pending = {
        stdin_write: memoryview(run.stdin.encode()),
        private_write: memoryview(bytes(run.private_input)),
    }
    outputs: dict[int, bytearray] = {out_read: bytearray(), err_read: bytearray()}
    for fd in (*pending, *outputs):
        os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    for fd in pending:
        selector.register(fd, selectors.EVENT_WRITE)
    for fd in outputs:
        selector.register(fd, selectors.EVENT_READ)
    deadline = started + limits.timeout_seconds
    timed_out = overflowed = False

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        exited = process.poll() is not None
        for key, _ in selector.select(0 if exited else min(remaining, 0.1)):
            fd = int(key.fd)
            if fd in pending:
                try:
                    written = os.write(fd, pending[fd][:65536])
                except (BrokenPipeError, BlockingIOError) as error:
                    written = -1 if isinstance(error, BrokenPipeError) else 0
                if written < 0 or written == len(pending[fd]):
                    selector.unregister(fd)
                    del pending[fd]
                    os.close(fd)
                else:
                    pending[fd] = pending[fd][written:]
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                selector.unregister(fd)
                continue
            buffer = outputs[fd]
            room = limits.output_bytes - len(buffer)
            buffer += chunk[: max(room, 0)]
            if len(chunk) > room:
                overflowed = True
        if overflowed:
            break
        if exited:
            # What its children still write after the program ended is not waited for.
            overflowed = drain(outputs, limits.output_bytes) or overflowed
            break
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    exit_code = process.wait()
    duration = time.monotonic() - started
    for fd in (*pending, *outputs):
        os.close(fd)
    selector.close()
    stdout, stderr = bytes(outputs[out_read]), bytes(outputs[err_read])
    return Outcome(
        stdout=stdout,
        stderr=stderr,
        exit_code=128 - exit_code if exit_code < 0 else exit_code,
        duration_seconds=duration,
        timed_out=timed_out,
        overflowed=overflowed,
    )


def drain(outputs: dict[int, bytearray], limit: int) -> bool:
    """Read what is already in the output pipes; whether a stream went past its limit."""
    overflowed = False
    for fd, buffer in outputs.items():
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            room = limit - len(buffer)
            buffer += chunk[: max(room, 0)]
            overflowed = overflowed or len(chunk) > room
    return overflowed


def clear(workdir: Path) -> None:
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def serve(executor: str, token: str, workdir: Path) -> int:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(executor, options=options) as channel:
        stub = executor_pb2_grpc.SandboxRunnerServiceStub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_SECONDS)
            run = stub.Claim(executor_pb2.ClaimRequest(claim_token=token), timeout=CLAIM_WAIT_SECONDS)
        except grpc.FutureTimeoutError:
            print(f"pod_runner: cannot reach the executor at {executor}", file=sys.stderr)
            return 4
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                return 0  # retired unused: the executor needs no more of this pod
            print(f"pod_runner: the claim was refused: {code.name} {error.details()}", file=sys.stderr)
            return 3 if code == grpc.StatusCode.PERMISSION_DENIED else 4
        clear(workdir)
        outcome = execute(place_files(workdir, run), run, workdir)
        stub.Report(
            executor_pb2.ReportRequest(
                report_token=run.report_token,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                exit_code=outcome.exit_code,
                duration_seconds=outcome.duration_seconds,
                timed_out=outcome.timed_out,
                overflowed=outcome.overflowed,
            ),
            timeout=REPORT_SECONDS,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pod_runner", description=__doc__.splitlines()[0])
    parser.add_argument("--executor", required=True, help="host:port of the executor's sandbox endpoint")
    parser.add_argument("--workdir", default=WORKDIR, help="the program's working directory (a volume)")
    arguments = parser.parse_args(argv)
    token = os.environ.pop(CLAIM_TOKEN_VARIABLE, "")
    if not arguments.executor or not token:
        print(f"pod_runner: --executor and {CLAIM_TOKEN_VARIABLE} are required", file=sys.stderr)
        return 2
    undumpable()
    return serve(arguments.executor, token, Path(arguments.workdir))


if __name__ == "__main__":
    sys.exit(main())
