"""Environment variables the sandbox or the runtimes in it give a meaning to. Neither a user's
secret (secrets service) nor a run's own `env` (executor) may set them: both services check
against this one list."""

from __future__ import annotations

RESERVED_NAMES = frozenset(
    {
        "PATH", "HOME", "PWD", "SHELL", "USER", "LOGNAME", "LANG", "TMPDIR", "TERM", "HOSTNAME",
        "PYTHONPATH", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH",
        # Read and run by the bash and JavaScript runtimes at start-up.
        "BASH_ENV", "ENV", "IFS", "NODE_OPTIONS", "NODE_PATH",
    }
)  # fmt: skip
RESERVED_PREFIXES = ("PYTHONON_", "PYTHON", "LD_", "LC_")
# The most secrets a user may hold (the secrets service's setting is bounded by it), and so the most
# names a run may ask for.
MAX_SECRETS_PER_USER = 1000


def is_reserved(name: str) -> bool:
    """Whether the sandbox owns this variable (compared case-insensitively)."""
    upper = name.upper()
    return upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES)
