"""Marker files, one per user, that one service keeps and another reads with one stat instead of a
call: "this user may have X". The keeper marks a user before the change that gives them X is
acknowledged and unmarks them only once they have none, so a reader that finds no marker can skip
asking (the packages service's users/ for the executor, the secrets service's markers likewise).
A marker may hold a short text (the packages service's: the key of the user's set), written
whole, by a rename, so that a reader never sees half of it.

Markers are a superset of the truth: a marker too many costs a call, never a wrong answer. A keeper
whose markers may be incomplete (e.g. before it has read its store at start-up) removes the
`.complete` file; a reader trusts the absence of a marker only while that file is there. Named by
a digest, so that no user id becomes a path."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

COMPLETE = ".complete"
# How long, for how many users and in how many bytes at most, a reader keeps what it learnt under a
# stamp (a user may hold 100 secrets of 64 KiB: the bytes bound the memory whatever users hold).
KEEP_SECONDS = 30.0
KEEP_USERS = 1000
KEEP_BYTES = 32 * 1024 * 1024
T = TypeVar("T")
# `stamp` of a user without a marker.
UNMARKED = ""


def new_stamp() -> str:
    """A marker's content that no earlier one had: what a keeper writes at each change."""
    return secrets.token_hex(8)


def marker_name(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()


class UserMarkers:
    def __init__(self, directory: Path, mode: int = 0o600) -> None:
        """`mode`: the markers' (0o600: the services, which share a uid, read them)."""
        self.directory = directory
        self.mode = mode

    def create(self) -> UserMarkers:
        """Make the directory (the keeper's side)."""
        self.directory.mkdir(mode=0o700 if self.mode == 0o600 else 0o755, parents=True, exist_ok=True)
        return self

    def path(self, user_id: str) -> Path:
        return self.directory / marker_name(user_id)

    # -- the reader's side --------------------------------------------------------------------------

    def may_have(self, user_id: str) -> bool:
        """False only when the keeper's markers are complete and this user has none."""
        if not user_id:
            return True
        return not (self.directory / COMPLETE).exists() or self.path(user_id).exists()

    def stamp(self, user_id: str) -> str | None:
        """What the user's marker says now, for a reader that keeps what it learnt while it says
        the same: its content (a keeper that writes a new stamp at each change, as the secrets
        service does, makes any change visible), UNMARKED when complete markers show the user has
        none, and None when the markers cannot be trusted yet, there is no user, or the marker
        carries no stamp (so it cannot tell one state from the next)."""
        if not user_id or not (self.directory / COMPLETE).exists():
            return None
        try:
            return self.path(user_id).read_text() or None
        except FileNotFoundError:
            return UNMARKED

    # -- the keeper's side --------------------------------------------------------------------------

    def mark(self, user_id: str, content: str = "") -> None:
        marker = self.path(user_id)
        partial = marker.with_name(f".{marker.name}.{secrets.token_hex(4)}")
        partial.write_text(content)
        partial.chmod(self.mode)
        partial.replace(marker)

    def unmark(self, user_id: str) -> None:
        self.path(user_id).unlink(missing_ok=True)

    def incomplete(self) -> None:
        """From now until `reconcile`, readers ask instead of trusting an absent marker."""
        (self.directory / COMPLETE).unlink(missing_ok=True)

    def reconcile(self, marks: Mapping[str, str]) -> None:
        """Exactly these users marked, each with its content (what the keeper's store holds);
        `.complete` is left as it is."""
        wanted = {marker_name(user_id) for user_id in marks}
        for entry in os.scandir(self.directory):
            if entry.name != COMPLETE and entry.name not in wanted:
                os.unlink(entry.path)  # a partial write that a stop interrupted too
        for user_id, content in marks.items():
            self.mark(user_id, content)

    def complete(self) -> None:
        """From now on, readers trust an absent marker."""
        (self.directory / COMPLETE).touch(mode=self.mode, exist_ok=True)


class KeptUnderStamp(Generic[T]):
    """What a reader learnt of each user (e.g. the values of their secrets), kept while the user's
    marker holds the stamp it was learnt under (a keeper that stamps writes a new one before it
    acknowledges any change) and for at most KEEP_SECONDS (a change made by other means than the
    keeper shows within that); for the users asked about last, at most KEEP_USERS of them and
    KEEP_BYTES in all, as `size` counts them. Callers must not change what they are given: it is
    the kept object itself."""

    def __init__(
        self,
        size: Callable[[T], int],
        seconds: float = KEEP_SECONDS,
        users: int = KEEP_USERS,
        most_bytes: int = KEEP_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._size = size
        self._seconds = seconds
        self._users = users
        self._most_bytes = most_bytes
        self._clock = clock
        self._kept: OrderedDict[str, tuple[str, float, T, int]] = OrderedDict()
        self._bytes = 0

    def get(self, user_id: str, stamp: str) -> T | None:
        kept = self._kept.get(user_id)
        if kept is None:
            return None
        kept_stamp, until, value, _ = kept
        if kept_stamp != stamp or self._clock() >= until:
            self._drop(user_id)
            return None
        self._kept.move_to_end(user_id)
        return value

    def keep(self, user_id: str, stamp: str, value: T) -> None:
        self._drop(user_id)
        size = self._size(value)
        if size > self._most_bytes:
            return
        self._kept[user_id] = (stamp, self._clock() + self._seconds, value, size)
        self._bytes += size
        while len(self._kept) > self._users or self._bytes > self._most_bytes:
            self._drop(next(iter(self._kept)))

    def _drop(self, user_id: str) -> None:
        kept = self._kept.pop(user_id, None)
        if kept is not None:
            self._bytes -= kept[3]
