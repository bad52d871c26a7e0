"""The first thing a warm Python sandbox runs, as `python -I -S -u -B -c <this file's source>`.

It signals that the interpreter is up, waits (for as long as the sandbox sits in the pool) for one
payload on fd 4, closes that pipe so the program cannot reach it, sets the environment, writes the
files and the code into the working directory, and then becomes the program: the code runs as
`__main__` with fresh globals, and a failure prints the traceback a plain `python main.py` would.

It ends the way the interpreter would (non-daemon threads joined, atexit callbacks run, the exit
status of SystemExit), then leaves with os._exit instead of tearing the interpreter down, which
here costs more than the whole run: the sandbox, with every file the program left unflushed, is
destroyed next anyway.

Under gVisor, which hands a container nothing but stdio, it runs as `... -c <source> stdin`: the
payload then comes first on stdin, framed as b"<length>\n", and carries the private input, which
the bootstrap puts on fd 3 itself. Importing this module elsewhere does nothing."""

import builtins
import marshal
import os
import resource
import sys

PAYLOAD_FD = 4
READY_FD = 5


def _warm_up():
    """Touch the compiler once before waiting, so that the run does not pay for its first use."""
    compile("def f(x):\n    return [str(i) for i in x if i]\nprint(f(range(3)))\n", "<warm-up>", "exec")


def _receive():
    os.write(READY_FD, b"R")
    os.close(READY_FD)
    chunks = []
    while True:
        chunk = os.read(PAYLOAD_FD, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(PAYLOAD_FD)
    return marshal.loads(b"".join(chunks))  # noqa: S302 - written by the backend, before the program runs


def _receive_from_stdin():
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            os._exit(70)
        header += byte
    size = int(header)
    data = bytearray()
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            os._exit(70)
        data += chunk
    payload = marshal.loads(bytes(data))  # noqa: S302 - written by the backend, before the program runs
    private = memoryview(payload.pop("private", b""))
    fd = os.memfd_create("private-input")
    while private:
        private = private[os.write(fd, private) :]
    os.lseek(fd, 0, os.SEEK_SET)
    if fd == 3:
        os.set_inheritable(fd, True)
    else:
        os.dup2(fd, 3)
        os.close(fd)
    return payload


def _write(path, data):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _main():
    payload = _receive_from_stdin() if sys.argv[1:] == ["stdin"] else _receive()
    cpu = payload["cpu_seconds"]
    if resource.getrlimit(resource.RLIMIT_CPU)[1] > cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    workdir = payload["workdir"]
    os.environ.clear()
    os.environ.update(payload["env"])  # through putenv, so child processes see it too
    os.chdir(workdir)
    for name, data in payload["files"].items():
        _write(os.path.join(workdir, name), data)
    path = os.path.join(workdir, payload["main"])
    source = payload["code"]
    _write(path, source.encode())
    del payload

    main = type(sys)("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv[:] = [path]
    extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    sys.path[0:0] = [workdir, *extra]
    try:
        exec(compile(source, path, "exec"), main.__dict__)  # noqa: S102 - running the user's program is the point
        status = 0
    except SystemExit as exit:
        status = _exit_status(exit.code)
    except BaseException as error:  # noqa: BLE001 - report exactly as the interpreter would
        # Without this function's own frame, as if the code had been the script.
        error = error.with_traceback(error.__traceback__.tb_next if error.__traceback__ else None)
        sys.excepthook(type(error), error, error.__traceback__)
        status = 1
    _finish(status)


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001, S110 - nothing more to tell
        pass
    return 1


def _finish(status):
    threading = sys.modules.get("threading")
    if threading is not None and hasattr(threading, "_shutdown"):
        threading._shutdown()  # joins non-daemon threads, as interpreter shutdown does
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed or broken stream has nothing left to flush
            pass
    os._exit(status)


if __name__ == "__main__":
    _warm_up()
    _main()
