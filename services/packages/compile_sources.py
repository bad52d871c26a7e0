"""Compile the Python sources named on stdin (one path a line) into hash-based, unchecked .pyc
files in their __pycache__ directories: what `compileall --invalidation-mode unchecked-hash`
writes, without compileall's imports and its second read of each file (0.16 against 0.19 s for
the 82 modules of `requests`, one process).

Run by the sandbox's interpreter as a script (`python -I -S compile_sources.py`), so that the files
are its own version's; it imports little beyond what that interpreter loads at its start
(importlib.util), and must keep to the Python versions a sandbox may run (3.8 and later). A file
that does not compile (e.g. a test file of another Python) is left without, as compileall leaves
it; a compiled file is written whole or not at all (renamed into place)."""

import os
import sys
from importlib import util

# What py_compile writes a hash-based .pyc with; private, so typeshed does not list it.
from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]  # not in typeshed


def compile_source(source_path: str) -> None:
    try:
        with open(source_path, "rb") as source_file:
            source = source_file.read()
        code = compile(source, source_path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError):
        return
    compiled_path = util.cache_from_source(source_path)
    os.makedirs(os.path.dirname(compiled_path), exist_ok=True)
    partial = f"{compiled_path}.{os.getpid()}"
    try:
        with open(partial, "wb") as compiled_file:
            compiled_file.write(_code_to_hash_pyc(code, util.source_hash(source), checked=False))
        os.replace(partial, compiled_path)
    except OSError:
        # e.g. the disk filled: no half-written file stays in the environment.
        if os.path.exists(partial):
            os.remove(partial)
        raise


if __name__ == "__main__":
    for line in sys.stdin:
        if line.strip():
            compile_source(line.rstrip("\n"))
