"""Runs inside the sandbox of an encrypted run: decrypts the code there, then becomes the program.

The executor never has the code in clear: it sends this file as the run's program (Python), or
has Bash exec it (`python3 -I -S -B <this file>`, for JavaScript and Bash code, whose sandbox is
the Bash root: it holds python3 and node too). What it needs comes on file descriptor 3 (the run's
private input, never its environment, argv or a file): JSON {token, language, password, payload}.
The decryption libraries (PyNaCl, argon2-cffi and the recipe, services/zk/recipe.py) are bound
read-only under LIBRARIES for these runs only, and put on sys.path only while decrypting. The key
derivation runs here, so the run's own memory and CPU limits hold it.

When the code cannot be decrypted it never runs: the decryptor writes
b"\\0pythonon-zk <token> <reason>\\n" on stderr and exits with REFUSED_STATUS; the executor takes
that as a refusal only with this run's token, which the user's code never sees (it did not run).
Reasons: "wrong-password" (the AEAD tag does not verify), "kdf-memory" (the key derivation could
not get its memory within the run's limit), "malformed" (a payload the recipe does not describe).

Stand-alone: imports nothing of the project but the recipe, and runs on the sandbox's interpreter."""

import builtins
import json
import os
import sys

LIBRARIES = "/opt/pythonon-zk/lib"
PRIVATE_FD = 3
REFUSED_STATUS = 85
MARKER = b"\0pythonon-zk "
WORKDIR = "/workspace"
# What a program of each language is written to and run with (as an ordinary run of it would be).
PROGRAMS = {
    "python": ("main.py", None),
    "javascript": ("main.js", "/usr/bin/node"),
    "bash": ("main.sh", "/usr/bin/bash"),
}


def _read_private():
    chunks = []
    while True:
        chunk = os.read(PRIVATE_FD, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(PRIVATE_FD)
    return json.loads(b"".join(chunks))


def _refuse(token, reason):
    os.write(2, MARKER + f"{token} {reason}\n".encode())
    sys.exit(REFUSED_STATUS)


def _decrypt(request):
    """The code in clear, or a refusal (the process exits)."""
    token = request["token"]
    sys.path.append(LIBRARIES)
    try:
        import zk_recipe  # type: ignore[import-not-found]  # the recipe, bound at LIBRARIES in the sandbox only
        from argon2.exceptions import HashingError

        try:
            payload = zk_recipe.ZkPayload.from_json(request["payload"])
            return zk_recipe.decrypt(payload, request["password"])
        except zk_recipe.DecryptionFailed:
            _refuse(token, "wrong-password")
        except zk_recipe.NotText:
            _refuse(token, "not-text")
        except zk_recipe.PayloadError:
            _refuse(token, "malformed")
        except (HashingError, MemoryError):
            _refuse(token, "kdf-memory")
    finally:
        sys.path.remove(LIBRARIES)


def _run_python(path, source):
    """As the Python bootstrap runs a program: `__main__` with fresh globals, a plain traceback."""
    main = type(sys)("__main__")
    vars(main).update(__file__=path, __cached__=None, __builtins__=builtins)
    sys.modules["__main__"] = main
    sys.argv[:] = [path]
    try:
        code = compile(source, path, "exec")
    except SyntaxError as error:
        sys.excepthook(type(error), error, None)
        sys.exit(1)
    del source
    try:
        exec(code, main.__dict__)  # noqa: S102 - running the user's program is the point
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - report exactly as the interpreter would
        # Without this function's frame, as if the code had been the script.
        error = error.with_traceback(error.__traceback__.tb_next if error.__traceback__ else None)
        sys.excepthook(type(error), error, error.__traceback__)
        sys.exit(1)


def _main():
    request = _read_private()
    language = request["language"]
    main_file, interpreter = PROGRAMS[language]
    source = _decrypt(request)
    request.clear()  # the password goes before the program starts
    path = os.path.join(WORKDIR, main_file)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(source)
    if interpreter is None:
        _run_python(path, source)
        return
    wrapper = os.path.join(WORKDIR, PROGRAMS["bash"][0])
    if language != "bash" and os.path.exists(wrapper):
        os.unlink(wrapper)  # the Bash line that started this decryptor, not the user's
    os.execve(interpreter, [os.path.basename(interpreter), path], dict(os.environ))  # noqa: S606 - no shell wanted


if __name__ == "__main__":  # importing this module elsewhere does nothing
    _main()
