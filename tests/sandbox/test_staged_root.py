"""A runtime's tree (staged_root.py): small files copied into its tmpfs, large files and directories
bound read-only, links made in it; nothing of it left mounted once closed. And the executor, as
root, runs in a mount namespace of its own (where the trees are mounted)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.executor.sandbox.staged_root import COPY_LIMIT, StagedRoots, StagingFailed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="trees are mounted as root")


def _mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as table:
        return [line.split()[4] for line in table if line.split()[4].startswith(str(directory))]


def test_small_files_are_copied_large_ones_and_directories_bound_read_only_and_all_unmounted_at_close(
    tmp_path: Path,
) -> None:
    host = tmp_path / "host"
    (host / "lib").mkdir(parents=True)
    (host / "lib" / "small.so.1.2").write_bytes(b"small")
    (host / "big.so").write_bytes(b"b" * (COPY_LIMIT + 1))
    (host / "share").mkdir()
    (host / "share" / "data").write_text("shared")
    stage = tmp_path / "stage"
    roots = StagedRoots(stage)
    try:
        top = roots.build(
            "python",
            [
                (str(host / "lib" / "small.so.1.2"), "/usr/lib/small.so.1"),
                (str(host / "big.so"), "/usr/lib/big.so"),
                (str(host / "share"), "/usr/share/things"),
                (str(host / "big.so"), "/opt/runtime/big.so"),
            ],
            [("small.so.1", "/usr/lib/small.so"), ("usr/lib", "/lib")],
        )
        tree = stage / "python"
        assert top == [(str(tree / "opt"), "/opt"), (str(tree / "usr"), "/usr")]
        assert roots.tree("python") == top and roots.tree("bash") is None
        copied = tree / "usr/lib/small.so.1"
        assert copied.read_bytes() == b"small"
        assert copied.stat().st_ino != (host / "lib" / "small.so.1.2").stat().st_ino  # a copy
        assert (tree / "usr/lib/small.so").read_bytes() == b"small"  # the link, made in the tree
        assert not (tree / "lib").exists()  # a link outside the tree's directories is the sandbox's
        bound = tree / "usr/lib/big.so"
        assert bound.stat().st_ino == (host / "big.so").stat().st_ino  # the host's file itself
        assert (tree / "usr/share/things/data").read_text() == "shared"
        for read_only in (bound, tree / "usr/share/things/data"):
            with pytest.raises(OSError) as refused:
                read_only.write_text("changed")
            assert refused.value.errno == errno.EROFS
        # Every directory is traversable by a sandbox's uid, whatever the umask.
        assert oct((tree / "usr/share").stat().st_mode & 0o777) == "0o755"
        assert len(_mounts_under(stage)) == 4  # the tmpfs and three binds; the copy is no mount
        with pytest.raises(StagingFailed, match="the bash runtime's tree"):
            roots.build("bash", [(str(host / "gone"), "/usr/bin/gone")], [])
    finally:
        roots.close()
    assert _mounts_under(stage) == []
    assert (host / "big.so").stat().st_size == COPY_LIMIT + 1  # the host's files untouched
    assert list(stage.iterdir()) == []  # the copies went with the tmpfs


def test_the_executor_enters_a_mount_namespace_of_its_own_before_it_imports_the_rest() -> None:
    """`python -m services.executor` as root execs itself under unshare first: same pid, another
    mount namespace; its mounts never reach the host's."""
    script = (
        "import os, sys\n"
        "from services.executor.mount_namespace import enter_own_mount_namespace, in_own_mount_namespace\n"
        "if os.environ.get('STEP') != 'again':\n"
        "    print(os.getpid(), os.readlink('/proc/self/ns/mnt'), in_own_mount_namespace(), flush=True)\n"
        "    os.environ['STEP'] = 'again'\n"
        "enter_own_mount_namespace()\n"
        "print(os.getpid(), os.readlink('/proc/self/ns/mnt'), in_own_mount_namespace(), flush=True)\n"
        "enter_own_mount_namespace()  # once in one, nothing happens\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split("\n")
    before, after = out[0].split(), out[1].split()
    assert before[0] == after[0]  # the same process
    assert before[1] == os.readlink("/proc/self/ns/mnt") and before[2] == "False"
    assert after[1] != before[1] and after[2] == "True"
    assert out[2:] == [""]
