"""The memory a running mesh holds: every process of it (each part's process tree: a service's
sandboxes count as the executor's), as resident set (RSS, shared pages counted in every process
that maps them) and as proportional set (PSS, each shared page split among its sharers: what the
mesh as a whole costs the machine)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

KIB = 1024


def process_tree(pid: int) -> Iterator[int]:
    yield pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in children:
        yield from process_tree(int(child))


def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; zeros when it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * KIB
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("Rss", 0), values.get("Pss", 0)


def usage(pids: Iterable[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes of these processes and all their descendants."""
    rss = pss = 0
    for root in pids:
        for pid in process_tree(root):
            one_rss, one_pss = _rollup(pid)
            rss, pss = rss + one_rss, pss + one_pss
    return rss, pss


def by_part(parts: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(RSS, PSS) of each part of the mesh (its name → its process id)."""
    return {name: usage([pid]) for name, pid in sorted(parts.items())}
