"""The first thing a warm Python sandbox runs, as `python -I -S -u -B -c <this file's source>`.

It signals that the interpreter is up, waits (for as long as the sandbox sits in the pool) for one
payload, sets the environment, writes the files and the code into the working directory, and then
becomes the program: the code runs as `__main__` with fresh globals, and a failure prints the
traceback a plain `python main.py` would.

The payload is one frame, b"<decimal length>\n" + records (runtimes.py writes them): each record
a line b"<kind> <size> [<size>]\n" followed by that many bytes per field. Plain data, so that this
interpreter's version need not match the executor's, and parsed with builtins only (importing
json would cost each sandbox's start ~12 ms: it pulls in re and enum). Under bwrap the ready
signal is b"R" on fd 5 and the frame comes on fd 4, closed once read so the program cannot reach
it. Under gVisor, which hands a container nothing but stdio, it runs as `... -c <source> stdin`:
the ready signal is b"R" on stdout (read by the backend before any output), the frame comes first
on stdin, and it carries the private input, which the bootstrap puts on fd 3 itself.

It ends the way the interpreter would (non-daemon threads joined, atexit callbacks run, the exit
status of SystemExit), then leaves with os._exit instead of tearing the interpreter down, which
here costs more than the whole run: the sandbox, with every file the program left unflushed, is
destroyed next anyway. When the payload has an `end_token`, the last thing written on stderr is
b"\\0pythonon-exit <token> <status>\\n", for the backend. Importing this module elsewhere does nothing."""

import builtins
import os
import resource
import sys

PAYLOAD_FD = 4
READY_FD = 5


def _warm_up():
    """Touch the compiler once before waiting, so that the run does not pay for its first use."""
    compile("def f(x):\n    return [str(i) for i in x if i]\nprint(f(range(3)))\n", "<warm-up>", "exec")


def _read_exactly(fd, size):
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            os._exit(70)
        data += chunk
    return bytes(data)


def _read_frame(fd):
    """One frame: its length, then exactly that many bytes (whatever follows is not read)."""
    header = b""
    while not header.endswith(b"\n"):
        header += _read_exactly(fd, 1)
    return _parse(_read_exactly(fd, int(header)))


def _parse(data):
    """The records: `env` and `file` (two fields: name, value) gather into dicts, others are single."""
    payload: dict = {
        "env": {},
        "file": {},
    }  # a bare annotation: importing typing here would cost every sandbox
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        kind, *sizes = data[at:end].decode().split(" ")
        at = end + 1
        fields = []
        for size in sizes:
            fields.append(data[at : at + int(size)])
            at += int(size)
        if kind == "env":
            payload["env"][fields[0].decode()] = fields[1].decode()
        elif kind == "file":
            payload["file"][fields[0].decode()] = fields[1]
        else:
            payload[kind] = fields[0]
    return payload


def _receive():
    os.write(READY_FD, b"R")
    os.close(READY_FD)
    payload = _read_frame(PAYLOAD_FD)
    os.close(PAYLOAD_FD)
    return payload


def _receive_from_stdin():
    os.write(1, b"R")
    payload = _read_frame(0)
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
    cpu = int(payload["cpu"])
    if resource.getrlimit(resource.RLIMIT_CPU)[1] > cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    workdir = payload["workdir"].decode()
    os.environ.clear()
    os.environ.update(payload["env"])  # through putenv, so child processes see it too
    os.chdir(workdir)
    for name, data in payload["file"].items():
        _write(os.path.join(workdir, name), data)
    path = os.path.join(workdir, payload["main"].decode())
    _write(path, payload["code"])
    source = payload["code"].decode()
    end_token = payload.get("end")
    del payload

    main = type(sys)("__main__")
    vars(main).update(__file__=path, __cached__=None, __builtins__=builtins)
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
    _finish(status, end_token)


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


def _finish(status, end_token):
    threading = sys.modules.get("threading")
    if threading is not None and hasattr(threading, "_shutdown"):
        threading._shutdown()  # joins non-daemon threads, as interpreter shutdown does
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed or broken stream has nothing left to flush
            pass
    if end_token is not None:
        os.write(2, b"\0pythonon-exit %s %d\n" % (end_token, status))
    os._exit(status)


if __name__ == "__main__":
    _warm_up()
    _main()
