"""Email and password rules, API key storage and the rate-limit buckets."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag

from services.auth import passwords
from services.auth.accounts import normalize_email
from services.auth.api_keys import ApiKeys
from services.auth.rate_limits import TokenBuckets
from services.auth.settings import RateLimit
from services.platform.errors import InvalidArgument


@pytest.mark.parametrize(
    "email", ["", "plain", "a@b", "a@@b.com", "a b@c.com", "a@-b.com", "x" * 250 + "@b.com"]
)
def test_malformed_emails_are_refused(email: str) -> None:
    with pytest.raises(InvalidArgument):
        normalize_email(email)


def test_emails_are_case_insensitive() -> None:
    assert normalize_email("  Ada@Example.COM ") == "ada@example.com"


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short1", "at least 10"),
        ("aaaaaaaaaaaa", "different characters"),
        ("password123", "too common"),
        ("ada.lovelace-2024!", "email"),
        ("x" * 300, "at most"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        passwords.check_strength(password, "ada.lovelace@example.com")


def test_password_hashes_are_argon2id_and_verify() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert passwords.verify_password(stored, "correct horse battery")
    assert not passwords.verify_password(stored, "wrong horse battery")
    assert not passwords.verify_password(None, "correct horse battery")


def test_api_keys_are_stored_as_digest_and_ciphertext_only() -> None:
    keys = ApiKeys(os.urandom(32))
    key = keys.new()
    digest, ciphertext = keys.digest(key), keys.encrypt(key, "user-1")
    assert key not in digest and key.encode() not in ciphertext
    assert keys.digest(key) == digest
    assert keys.decrypt(ciphertext, "user-1") == key
    assert ApiKeys(os.urandom(32)).digest(key) != digest
    with pytest.raises(InvalidTag):  # bound to its user: another user's row cannot be swapped in
        keys.decrypt(ciphertext, "user-2")


def test_token_buckets_allow_a_burst_then_say_when_to_retry() -> None:
    buckets = TokenBuckets(RateLimit(burst=3, per_minute=60))
    assert [buckets.take("ip", now=100.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.take("ip", now=100.0) == 1
    assert buckets.take("other", now=100.0) == 0
    assert buckets.take("ip", now=101.0) == 0
