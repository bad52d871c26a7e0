"""The executor's own mount namespace (standard library only: __main__ enters it before importing
anything else)."""

from __future__ import annotations

import os
import shutil
import sys


def in_own_mount_namespace() -> bool:
    """True when this process's mount namespace is not its parent's (someone made it one)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False


def enter_own_mount_namespace() -> None:
    """As root, become this same program again in a mount namespace of its own (util-linux's
    `unshare --mount`, which execs in place: same pid, same parent). Mounts of the host still reach
    it (slave propagation); its own never leave it. Without root or unshare, or when already in a
    namespace of its own, nothing happens. Call before any thread starts."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or in_own_mount_namespace():
        return
    argv = [unshare, "--mount", "--propagation", "slave", "--", sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(unshare, argv)  # noqa: S606 - a fixed program, replacing this one in place
