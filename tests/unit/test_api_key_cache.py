"""The edge check's short memory of which user an API key names."""

from __future__ import annotations

from services.auth.api_keys import RecentApiKeys
from services.platform.identity import Identity

ALICE = Identity("user-a", "alice@example.com")
BOB = Identity("user-b", "bob@example.com")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_remembered_key_names_its_user_until_the_ttl_passes() -> None:
    clock = Clock()
    recent = RecentApiKeys(30, clock=clock)
    recent.put("digest-a", ALICE)
    recent.put("digest-b", BOB)
    assert recent.get("digest-a") == ALICE
    assert recent.get("digest-b") == BOB
    clock.now += 29.9
    assert recent.get("digest-a") == ALICE
    clock.now += 0.1
    assert recent.get("digest-a") is None


def test_unknown_and_forgotten_keys_are_not_answered() -> None:
    recent = RecentApiKeys(30)
    assert recent.get("never-seen") is None
    recent.put("digest-a", ALICE)
    recent.forget("digest-a")
    assert recent.get("digest-a") is None


def test_the_oldest_keys_go_first_when_full() -> None:
    recent = RecentApiKeys(30, max_entries=2)
    recent.put("one", ALICE)
    recent.put("two", BOB)
    recent.put("three", ALICE)
    assert recent.get("one") is None
    assert recent.get("two") == BOB
    assert recent.get("three") == ALICE


def test_a_ttl_of_zero_remembers_nothing() -> None:
    recent = RecentApiKeys(0)
    recent.put("digest-a", ALICE)
    assert recent.get("digest-a") is None
