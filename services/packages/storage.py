"""The packages service's repository: each function is the body of one short transaction
(`Database.run`), and knows nothing of requests, builds in progress or the disk."""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.packages.models import Build, UserPackage, UserSet
from services.packages.requirements import PackageSpec
from services.platform.db import utc_now

PENDING, BUILDING, READY, FAILED = "pending", "building", "ready", "failed"


@dataclass(frozen=True)
class BuildState:
    set_key: str
    requirements: list[str]
    status: str
    reason: str = ""
    environment_key: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Build) -> BuildState:
        return cls(
            set_key=row.set_key,
            requirements=row.requirements.splitlines(),
            status=row.status,
            reason=row.reason,
            environment_key=row.environment_key,
            versions=dict(row.versions),
        )


@dataclass(frozen=True)
class UserState:
    """A user's list and the build of the set it makes (None: an empty list)."""

    packages: list[PackageSpec]
    build: BuildState | None


def user_state(session: Session, user_id: str) -> UserState:
    rows = session.scalars(
        sa.select(UserPackage).where(UserPackage.user_id == user_id).order_by(UserPackage.position)
    ).all()
    chosen = session.get(UserSet, user_id)
    build = session.get(Build, chosen.set_key) if chosen is not None else None
    return UserState(
        packages=[PackageSpec(name=row.name, spec=row.spec) for row in rows],
        build=BuildState.of(build) if build is not None else None,
    )


def replace_list(
    session: Session, user_id: str, packages: list[PackageSpec], set_key: str | None
) -> BuildState | None:
    """Make `packages` the user's list and `set_key` its set (None: the list is empty). A set new
    to the service gets a pending build; one whose build failed is tried again. Returns the build."""
    session.execute(sa.delete(UserPackage).where(UserPackage.user_id == user_id))
    for position, spec in enumerate(packages):
        session.add(UserPackage(user_id=user_id, name=spec.name, spec=spec.spec, position=position))
    chosen = session.get(UserSet, user_id)
    if set_key is None:
        if chosen is not None:
            session.delete(chosen)
        return None
    now = utc_now()
    if chosen is None:
        session.add(UserSet(user_id=user_id, set_key=set_key, updated_at=now))
    else:
        chosen.set_key = set_key
        chosen.updated_at = now
    build = session.get(Build, set_key)
    if build is None:
        build = Build(
            set_key=set_key,
            requirements="\n".join(sorted(spec.spec for spec in packages)),
            status=PENDING,
            reason="",
            environment_key="",
            versions={},
            created_at=now,
            updated_at=now,
        )
        session.add(build)
    elif build.status == FAILED:
        build.status, build.reason, build.updated_at = PENDING, "", now
    session.flush()
    return BuildState.of(build)


def build_state(session: Session, set_key: str) -> BuildState | None:
    build = session.get(Build, set_key)
    return BuildState.of(build) if build is not None else None


def set_build(
    session: Session,
    set_key: str,
    status: str,
    *,
    reason: str = "",
    environment_key: str = "",
    versions: dict[str, str] | None = None,
) -> None:
    build = session.get(Build, set_key)
    if build is None:
        return  # collected while it was being built: nobody wants it any more
    build.status = status
    build.reason = reason
    build.environment_key = environment_key
    build.versions = dict(versions or {})
    build.updated_at = utc_now()


def unfinished_builds(session: Session) -> list[BuildState]:
    """Builds some user wants that have not finished (e.g. interrupted by a restart)."""
    rows = session.scalars(
        sa.select(Build).where(
            Build.status.in_((PENDING, BUILDING)), Build.set_key.in_(sa.select(UserSet.set_key))
        )
    ).all()
    return [BuildState.of(row) for row in rows]


def users_with_packages(session: Session) -> dict[str, str]:
    """user id -> the key of the set their list makes, for every user with a list."""
    return {row.user_id: row.set_key for row in session.execute(sa.select(UserSet.user_id, UserSet.set_key))}


def collect_unwanted(session: Session) -> set[str]:
    """Delete the builds no user's list names any more; returns the environment keys that some
    remaining build still uses (every other environment on disk may go)."""
    wanted = sa.select(UserSet.set_key)
    session.execute(sa.delete(Build).where(Build.set_key.not_in(wanted)))
    keys = session.scalars(sa.select(Build.environment_key).where(Build.environment_key != "")).all()
    return set(keys)
