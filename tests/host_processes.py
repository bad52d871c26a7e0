"""What a sandbox leaves on the host: as root, each sandbox runs under a host uid of its own, so the
processes of that uid are exactly the sandbox's."""

from __future__ import annotations

import os
import time
from pathlib import Path


def host_processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def no_process_left(uid: int, seconds: float = 5) -> bool:
    """Whether every process of a sandbox's uid is gone from the host within `seconds`. Without root
    the sandbox shares the service's uid and nothing can be concluded, so it answers True."""
    if os.geteuid() != 0:
        return True
    assert uid != 0, "the sandbox ran as root on the host"
    deadline = time.monotonic() + seconds
    while host_processes_of(uid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
