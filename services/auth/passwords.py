"""Password rules and Argon2id hashing."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import argon2

from services.platform.errors import InvalidArgument

MIN_LENGTH = 10
MAX_LENGTH = 256
# The most common choices that pass the length rule; a real deployment can extend this list.
COMMON = frozenset(
    {
        "password123",
        "password1234",
        "1234567890",
        "qwertyuiop",
        "123456789a",
        "iloveyou123",
        "passw0rd123",
        "letmein1234",
        "welcome1234",
        "administrator",
        "qwerty12345",
        "0987654321",
    }
)

_hasher = argon2.PasswordHasher(type=argon2.Type.ID)
# Verified against when the email is unknown, so a wrong email costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a real password, only for equal timing")


def check_strength(password: str, email: str) -> None:
    """Refuse weak passwords with a message that says what to change."""
    if len(password) < MIN_LENGTH:
        raise InvalidArgument(f"password must be at least {MIN_LENGTH} characters long")
    if len(password) > MAX_LENGTH:
        raise InvalidArgument(f"password must be at most {MAX_LENGTH} characters long")
    if len(set(password)) < 5:
        raise InvalidArgument("password must use at least 5 different characters")
    if password.lower() in COMMON:
        raise InvalidArgument("password is too common")
    local_part = email.split("@", 1)[0].lower()
    if len(local_part) >= 4 and local_part in password.lower():
        raise InvalidArgument("password must not contain the email address")


# Argon2id takes most of a core and 64 MiB per hash: at most one per core at a time, on threads of
# their own, so that a burst of registrations or logins queues here instead of starving the
# database's threads (and with them every other user's edge check).
_HASHING = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="argon2")


async def hash_in_background(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_HASHING, hash_password, password)


async def verify_in_background(password_hash: str | None, password: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(
        _HASHING, verify_password, password_hash, password
    )


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant work whether or not the user exists (pass None for an unknown user)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
