"""What a user may ask for: PEP 508 names with version specifiers, nothing that could steer the
installer (URLs, paths, VCS references, environment markers, pip options), within a size bound.

A refusal names the offending entry, so the caller can fix it; nothing is changed by a refused list."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from services.platform.errors import InvalidArgument

MAX_PACKAGES = 50
MAX_NAME_CHARACTERS = 100
MAX_SPEC_CHARACTERS = 200
# The longest number in a version the installer takes (uv: below 2**64 - 1, so 19 digits may not
# fit); packaging takes any, and a longer one would fail the whole set's build in uv's words.
MAX_VERSION_DIGITS = 18
_DIGITS = re.compile(r"[0-9]+")
# A name as PEP 508 spells it (and nothing else: no path separators, no option dashes first).
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# Anything that means "fetch from somewhere else" or "run something", whatever the parser makes of it.
_REFERENCE_MARKERS = ("://", "file:", "git+", "hg+", "svn+", "bzr+", "@", "/", "\\", ";")


@dataclass(frozen=True, order=True)
class PackageSpec:
    """One accepted requirement: `name` canonical (PEP 503), `spec` the requirement as it will be
    given to the resolver (name, extras and specifiers only), e.g. "requests[socks]>=2.31"."""

    name: str
    spec: str


def parse(entry: str) -> PackageSpec:
    """The requirement `entry`, or InvalidArgument saying what is wrong with it."""
    if not isinstance(entry, str) or not entry.strip():
        raise InvalidArgument("a package must be a non-empty requirement such as 'requests>=2.31'")
    text = entry.strip()
    shown = _shown(text)
    if len(text) > MAX_SPEC_CHARACTERS:
        raise InvalidArgument(f"package {shown}: longer than {MAX_SPEC_CHARACTERS} characters")
    if text.startswith("-"):
        raise InvalidArgument(f"package {shown}: installer options are not accepted, only requirements")
    if any(marker in text for marker in _REFERENCE_MARKERS):
        raise InvalidArgument(
            f"package {shown}: only a name and version specifiers are accepted "
            "(no URLs, paths, VCS references or environment markers)"
        )
    if any(character.isspace() for character in text.replace(" ", "")) or "\x00" in text:
        raise InvalidArgument(f"package {shown}: contains control characters")
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        raise InvalidArgument(
            f"package {shown}: not a valid requirement (expected a name and optional version "
            "specifiers, e.g. 'requests>=2.31')"
        ) from None
    if requirement.url or requirement.marker is not None:
        raise InvalidArgument(f"package {shown}: URLs and environment markers are not accepted")
    if not _NAME.fullmatch(requirement.name):
        raise InvalidArgument(f"package {shown}: {requirement.name!r} is not a package name")
    if len(requirement.name) > MAX_NAME_CHARACTERS:
        raise InvalidArgument(f"package {shown}: the name is longer than {MAX_NAME_CHARACTERS} characters")
    for extra in requirement.extras:
        if not _NAME.fullmatch(extra):
            raise InvalidArgument(f"package {shown}: {extra!r} is not an extra's name")
    for specifier in requirement.specifier:
        if any(len(number.lstrip("0")) > MAX_VERSION_DIGITS for number in _DIGITS.findall(specifier.version)):
            raise InvalidArgument(
                f"package {shown}: a number in a version has at most {MAX_VERSION_DIGITS} digits"
            )
    extras = f"[{','.join(sorted(canonicalize_name(extra) for extra in requirement.extras))}]"
    specifiers = ",".join(sorted(str(specifier) for specifier in requirement.specifier))
    name = canonicalize_name(requirement.name)
    return PackageSpec(name=name, spec=f"{name}{extras if requirement.extras else ''}{specifiers}")


def parse_list(entries: Sequence[str]) -> list[PackageSpec]:
    """A whole list: each entry parsed, at most MAX_PACKAGES, no name twice; order kept."""
    if len(entries) > MAX_PACKAGES:
        raise InvalidArgument(f"at most {MAX_PACKAGES} packages, got {len(entries)}")
    specs: list[PackageSpec] = []
    seen: set[str] = set()
    for entry in entries:
        spec = parse(entry)
        if spec.name in seen:
            raise InvalidArgument(f"package {_shown(entry.strip())}: {spec.name} is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def check_name(name: str) -> str:
    """The canonical form of a package name given to remove, or InvalidArgument."""
    if not name or len(name) > MAX_NAME_CHARACTERS or not _NAME.fullmatch(name):
        raise InvalidArgument(f"package name {_shown(name)} is not a package name")
    return canonicalize_name(name)


def set_key(specs: Iterable[PackageSpec], target: str) -> str:
    """The key of a requirement set for one build target (interpreter, platform, index): equal
    sets in any order share it, and so share one build."""
    lines = sorted(spec.spec for spec in specs)
    return hashlib.sha256("\n".join([target, *lines]).encode()).hexdigest()


def _shown(text: str) -> str:
    """The entry as quoted in an error: bounded, so that a huge entry does not make a huge answer."""
    return repr(text if len(text) <= 120 else text[:117] + "...")
