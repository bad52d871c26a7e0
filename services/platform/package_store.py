"""The layout of the package environments' directory that the packages service writes and the
executor reads: the one thing the two share besides their gRPC contract, kept in one place."""

from __future__ import annotations

from pathlib import Path

from services.platform.user_markers import marker_name

ENVIRONMENTS = "environments"
USERS = "users"
# Where a run finds its user's environment (read-only) and what PYTHONPATH names.
SANDBOX_MOUNT = "/opt/pythonon/packages"


def user_marker(store: Path, user_id: str) -> Path:
    """Present exactly while the user's package list is not empty: the executor's one stat before a
    run, so that a user without packages costs no call. Named by a digest, so no user id is a path."""
    return store / USERS / marker_name(user_id)
