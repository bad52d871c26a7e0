"""What a stored payload may be called, and in which language it may be stored.

Names are file-like and case-insensitive: 1 to 64 letters, digits, dots, underscores and hyphens,
starting with a letter or a digit (e.g. `report.py`, `nightly-job`). `Report.PY` and `report.py`
name the same payload, and names are answered in lower case."""

from __future__ import annotations

import re

from services.platform.errors import InvalidArgument

MAX_NAME_LENGTH = 64
# Matched whole (fullmatch): "$" would let a trailing newline through.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
LANGUAGES = ("python", "javascript", "bash")
# The executor's aliases (services/executor/sandbox/languages.py), stored as the language they name.
_ALIASES = {"py": "python", "python3": "python", "js": "javascript", "node": "javascript"}
_ALIASES |= {"nodejs": "javascript", "sh": "bash", "shell": "bash"}


def check_name(name: str) -> str:
    """The name as stored (lower case), or InvalidArgument saying what a name may be."""
    if not name:
        raise InvalidArgument("a name is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"names are at most {MAX_NAME_LENGTH} characters")
    # ASCII before folding: "K".lower() is "k" (the Kelvin sign), which would alias another name.
    folded = name.lower() if name.isascii() else ""
    if not _NAME.fullmatch(folded):
        raise InvalidArgument(
            "a name is letters, digits, dots, underscores and hyphens, starting with a letter or a "
            "digit (e.g. report.py); names are case-insensitive"
        )
    return folded


def check_language(language: str) -> str:
    """The language as stored ("python" when none is named), or InvalidArgument naming the choices."""
    name = (language or "python").lower()
    name = _ALIASES.get(name, name)
    if name not in LANGUAGES:
        raise InvalidArgument(f"unknown language {language!r}; use one of {', '.join(LANGUAGES)}")
    return name
