"""What a secret may be: its name is an environment-variable name that the sandbox does not set
itself, its value and description are bounded. Every refusal is an InvalidArgument that says why."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.platform.errors import InvalidArgument
from services.platform.sandbox_environment import RESERVED_NAMES, RESERVED_PREFIXES

MAX_NAME_LENGTH = 64
MAX_DESCRIPTION_LENGTH = 1024
# Matched whole (fullmatch): "$" would let a trailing newline through.
_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def check_name(name: str) -> str:
    """The name, if it may name a secret; InvalidArgument otherwise."""
    if not name:
        raise InvalidArgument("a secret name is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"secret names are at most {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            "a secret name must be an environment-variable name: capital letters, digits and "
            "underscores, not starting with a digit (e.g. API_TOKEN)"
        )
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{name} is reserved: the sandbox sets it, so a secret cannot use that name")
    prefix = next((p for p in RESERVED_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        raise InvalidArgument(f"secret names starting with {prefix} are reserved for the sandbox")
    return name


def is_allowed_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidArgument:
        return False
    return True


@dataclass(frozen=True)
class SecretLimits:
    max_value_bytes: int
    max_secrets_per_user: int


def check_value(value: str, limits: SecretLimits) -> None:
    """A value is non-empty, bounded in UTF-8 bytes, and free of NUL (no environment can hold one).
    The messages never quote the value."""
    if not value:
        raise InvalidArgument("a secret value is required")
    size = len(value.encode("utf-8"))
    if size > limits.max_value_bytes:
        raise InvalidArgument(
            f"a secret value is at most {limits.max_value_bytes} bytes (UTF-8); this one is {size} bytes"
        )
    if "\x00" in value:
        raise InvalidArgument(
            "a secret value cannot contain NUL characters (an environment cannot hold them)"
        )


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(f"a secret description is at most {MAX_DESCRIPTION_LENGTH} characters")
    if any(ord(character) < 32 and character not in "\t\n" for character in description):
        raise InvalidArgument(
            "a secret description cannot contain control characters (tabs and newlines are fine)"
        )
