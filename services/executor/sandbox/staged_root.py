"""A runtime's files gathered once into one tree, so that a bwrap sandbox takes them in two mounts.

bwrap reads /proc/self/mountinfo again after each bind mount (to make the new mount and those under
it read-only), so a root of 35 binds cost every sandbox start 35 passes over a growing mount table:
bwrap took ~12.7 ms per sandbox start file by file, against ~6.2 ms for a root of two binds. Here,
as root, the executor builds each runtime's tree once, on first use: a tmpfs holding the
directories, a copy of each file up to COPY_LIMIT (most shared libraries), the runtime's symlinks,
and, bound read-only in place, what is larger or a directory (the standard library, libpython, libc,
node, the time zones). A sandbox then binds the tree's top-level directories (`/usr`, `/root`, ...)
and bwrap's recursive bind brings the few binds inside along.

The tree lives in the executor's own mount namespace (services/executor/mount_namespace.py,
entered before the executor imports anything else), so no other process on the host sees its
mounts and they vanish with the executor however it ends; a bound directory's mount table then
holds a handful of entries more, not 35. Inside the sandbox /proc/self/mountinfo shows less than
before (the copies are files of the tmpfs, shown under its own paths, such as `/usr`), and never
where the tree is kept. Outside such a namespace the backend binds file by file, as before."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("pythonon.executor.sandbox.staged_root")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2
# Files up to this size are copied into the tree; larger ones are bound. A copy's pages are shared
# by the sandboxes only, not with the host's processes: copying up to 8 MiB (libc and libcrypto
# too) made the idle executor's PSS 6 MiB larger for no measurable speed. The tmpfs's cap below.
COPY_LIMIT = 1 << 20
TREE_BYTES = 512 << 20


class StagingFailed(Exception):
    """A tree could not be built; the backend binds that runtime file by file instead."""


class _Libc:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        def encoded(text: str | None) -> bytes | None:
            return None if text is None else os.fsencode(text)

        if self._libc.mount(encoded(source), encoded(target), encoded(fstype), flags, encoded(data)) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount {source or fstype} on {target}: {os.strerror(error)}")

    def detach(self, target: str) -> None:
        if self._libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"unmount {target}: {os.strerror(error)}")


class StagedRoots:
    """The trees of a backend's runtimes, under `directory` (a tmpfs mounted there on the first
    tree); close() detaches everything (and frees the copies), and must come before anything
    removes `directory`."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._libc = _Libc()
        self._mounted = False
        self._trees: dict[str, list[tuple[str, str]]] = {}

    def tree(self, name: str) -> list[tuple[str, str]] | None:
        """The top-level binds (host path in the tree, path inside) of the tree `name`, if built."""
        return self._trees.get(name)

    def build(
        self, name: str, binds: Iterable[tuple[str, str]], links: Iterable[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """A tree holding `binds` (host path, path inside), copied or bound read-only, and those of
        the symlinks `links` (target, path inside) that lie in its directories (the sandbox's copy
        of the tree is read-only); its top-level binds. StagingFailed if any of it cannot be made
        (what was made of it stays until close())."""
        binds = list(binds)
        tops = sorted({Path(inside).parts[1] for _, inside in binds})
        try:
            if not self._mounted:
                self._directory.mkdir(mode=0o700, exist_ok=True)
                self._libc.mount(
                    "tmpfs",
                    str(self._directory),
                    "tmpfs",
                    MS_NOSUID | MS_NODEV,
                    f"size={TREE_BYTES},mode=0755",
                )
                self._mounted = True
            tree = self._directory / name
            _directory(tree)
            for host, inside in sorted(binds, key=lambda pair: pair[1].count("/")):
                at = tree / inside.lstrip("/")
                _directories(tree, at.parent)
                if os.path.isdir(host):
                    _directory(at)
                elif os.stat(host).st_size <= COPY_LIMIT:
                    shutil.copy2(host, at)  # a file of the tmpfs, with the host file's mode: no mount
                    continue
                else:
                    at.touch()
                self._libc.mount(host, str(at), None, MS_BIND | MS_REC, None)
                self._libc.mount(
                    None, str(at), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None
                )
            for target, inside in links:
                if Path(inside).parts[1] not in tops:
                    continue  # outside the tree: the sandbox makes it
                at = tree / inside.lstrip("/")
                _directories(tree, at.parent)
                at.symlink_to(target)
        except OSError as error:
            raise StagingFailed(f"the {name} runtime's tree: {error}") from error
        self._trees[name] = [(str(tree / entry), f"/{entry}") for entry in tops]
        return self._trees[name]

    def close(self) -> None:
        if self._mounted:
            try:
                self._libc.detach(str(self._directory))
            except OSError as error:
                log.warning("the sandboxes' staged trees stay mounted: %s", error)
                raise
            self._mounted = False
        self._trees.clear()


def _directory(path: Path) -> None:
    """A directory everyone may read and traverse, whatever the umask (the runner's is 077)."""
    path.mkdir()
    path.chmod(0o755)


def _directories(tree: Path, path: Path) -> None:
    """`path` and its missing parents up to `tree`, each as _directory makes it."""
    missing = []
    while path != tree and not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        _directory(directory)
