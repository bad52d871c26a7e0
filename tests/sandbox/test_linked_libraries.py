"""The libraries a sandbox binds: the loader is asked once per group of files alike in what decides
their libraries (elf.linkage), and the answer is the one it gives for each file on its own."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from services.executor.sandbox import elf, runtimes

LIB_DYNLOAD = Path(os.__file__).parent / "lib-dynload"  # the base interpreter's extensions


def _files() -> list[str]:
    """What an executor's start asks about: Python and its extensions, Bash and its tools."""
    tools = [shutil.which(name, path="/usr/bin:/bin") for name in ("bash", "ls", "cat", "sed", "grep", "env")]
    candidates = [sys.executable, *map(str, LIB_DYNLOAD.glob("*.so")), *filter(None, tools)]
    return sorted({os.path.realpath(path) for path in candidates})


def test_one_answer_per_group_is_what_the_loader_says_for_each_file_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = _files()
    monkeypatch.setattr(runtimes, "_LINKED", {})
    asked: list[str] = []
    real_ldd = runtimes._ldd

    def counting_ldd(batch: list[str]) -> dict[str, frozenset[str]]:
        asked.extend(batch)
        return real_ldd(batch)

    monkeypatch.setattr(runtimes, "_ldd", counting_ldd)
    runtimes.linked_libraries(files)

    assert len(files) > 30 and len(asked) < len(files) / 2  # grouped: far fewer loader runs
    for path in files:
        alone = real_ldd([path]).get(path, frozenset())
        assert runtimes._LINKED[(path, os.path.getmtime(path))] == alone, path
    assert any(runtimes._LINKED[(path, os.path.getmtime(path))] for path in files)


def test_linkage_tells_apart_what_the_loader_would(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(elf.NotElf):
        elf.linkage(str(script))
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(elf.MAGIC + b"\x02\x01\x01" + b"\0" * 20)
    with pytest.raises(ValueError):
        elf.linkage(str(truncated))
    extensions = {elf.linkage(str(path)) for path in LIB_DYNLOAD.glob("*.so")}
    assert len(extensions) > 1  # e.g. _ssl needs libssl where _json needs only libc
    # A copy elsewhere is alike unless its search paths say $ORIGIN.
    python = os.path.realpath(sys.executable)
    copy = tmp_path / "python"
    shutil.copy(python, copy)
    key = elf.linkage(python)
    assert (elf.linkage(str(copy)) == key) == (key[-1] in (None, "static"))
