"""Marker files, one per user, that one service keeps and another reads with one stat instead of a
call: "this user may have X". The keeper marks a user before the change that gives them X is
acknowledged and unmarks them only once they have none, so a reader that finds no marker can skip
asking (the packages service's users/ for the executor, the secrets service's markers likewise).

Markers are a superset of the truth: a marker too many costs a call, never a wrong answer. A keeper
whose markers may be incomplete (e.g. before it has read its store at start-up) removes the
`.complete` file; a reader trusts the absence of a marker only while that file is there. Named by
a digest, so that no user id becomes a path."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

COMPLETE = ".complete"


def marker_name(user_id: str) -> str:
    return hashlib.sha256(user_id.encode()).hexdigest()


class UserMarkers:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def create(self) -> UserMarkers:
        """Make the directory (the keeper's side); readable by the services only."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    def path(self, user_id: str) -> Path:
        return self.directory / marker_name(user_id)

    # -- the reader's side --------------------------------------------------------------------------

    def may_have(self, user_id: str) -> bool:
        """False only when the keeper's markers are complete and this user has none."""
        if not user_id:
            return True
        return not (self.directory / COMPLETE).exists() or self.path(user_id).exists()

    # -- the keeper's side --------------------------------------------------------------------------

    def mark(self, user_id: str) -> None:
        self.path(user_id).touch(mode=0o600, exist_ok=True)

    def unmark(self, user_id: str) -> None:
        self.path(user_id).unlink(missing_ok=True)

    def incomplete(self) -> None:
        """From now until `reconcile`, readers ask instead of trusting an absent marker."""
        (self.directory / COMPLETE).unlink(missing_ok=True)

    def reconcile(self, user_ids: Iterable[str]) -> None:
        """Exactly these users marked (what the keeper's store holds); still incomplete."""
        wanted = {marker_name(user_id) for user_id in user_ids}
        for entry in os.scandir(self.directory):
            if entry.name != COMPLETE and entry.name not in wanted:
                os.unlink(entry.path)
        for name in wanted:
            (self.directory / name).touch(mode=0o600, exist_ok=True)

    def complete(self) -> None:
        """From now on, readers trust an absent marker."""
        (self.directory / COMPLETE).touch(mode=0o600, exist_ok=True)
