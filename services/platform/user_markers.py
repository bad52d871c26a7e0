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
# How long, and for how many users at most, a reader keeps what it learnt under a stamp.
KEEP_SECONDS = 30.0
KEEP_USERS = 1000
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
    keeper shows within that); the KEEP_USERS users asked about last. Callers must not change what
    they are given: it is the kept object itself."""

    def __init__(
        self,
        seconds: float = KEEP_SECONDS,
        users: int = KEEP_USERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seconds = seconds
        self._users = users
        self._clock = clock
        self._kept: OrderedDict[str, tuple[str, float, T]] = OrderedDict()

    def get(self, user_id: str, stamp: str) -> T | None:
        kept = self._kept.get(user_id)
        if kept is None:
            return None
        kept_stamp, until, value = kept
        if kept_stamp != stamp or self._clock() >= until:
            del self._kept[user_id]
            return None
        self._kept.move_to_end(user_id)
        return value

    def keep(self, user_id: str, stamp: str, value: T) -> None:
        self._kept[user_id] = (stamp, self._clock() + self._seconds, value)
        self._kept.move_to_end(user_id)
        while len(self._kept) > self._users:
            self._kept.popitem(last=False)
