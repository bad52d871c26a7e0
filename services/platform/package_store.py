"""The layout of the package environments' directory that the packages service writes and the
executor reads: the one thing the two share besides their gRPC contract, kept in one place."""

from __future__ import annotations

from pathlib import Path

from services.platform.user_markers import UserMarkers

ENVIRONMENTS = "environments"
USERS = "users"
# Where a run finds its user's environment (read-only) and what PYTHONPATH names.
SANDBOX_MOUNT = "/opt/pythonon/packages"


def user_markers(store: Path) -> UserMarkers:
    """One marker per user whose package list is not empty, holding the key of the set the list
    makes: the executor reads it before a run, so that a user without packages costs no call and a
    user whose environment it was answered for before costs none either."""
    return UserMarkers(store / USERS, mode=0o644)
