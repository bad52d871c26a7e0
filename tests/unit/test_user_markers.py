"""User markers: a reader skips a call only for a user unmarked while the keeper's markers are
complete; the secrets service reconciles them with Vault at start (retrying while Vault is down)
and marks a user back when a put lands between its delete's last look and the unmarking."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.platform.errors import Unavailable
from services.platform.identity import Identity
from services.platform.user_markers import COMPLETE, UNMARKED, KeptUnderStamp, UserMarkers, new_stamp
from services.secrets.user_secrets import UserSecrets


class _Vault:
    """The two listings the markers use: users with entries, and one user's entry names."""

    def __init__(self, users: dict[str, list[str]], down_for: int = 0) -> None:
        self.entries = users
        self.down_for = down_for
        self.names_answers: list[list[str]] = []

    def users(self) -> list[str]:
        if self.down_for:
            self.down_for -= 1
            raise Unavailable("vault is sealed")
        return sorted(user for user, names in self.entries.items() if names)

    def names(self, uid: str) -> list[str]:
        return self.names_answers.pop(0) if self.names_answers else self.entries.get(uid, [])


def _keeper(vault: _Vault, markers: UserMarkers) -> UserSecrets:
    return UserSecrets(vault, audit=None, limits=None, markers=markers)  # type: ignore[arg-type]  # stand-ins: only the markers' paths run


def test_a_reader_skips_only_an_unmarked_user_of_complete_markers(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    assert markers.may_have("alice") and markers.may_have("bob")  # not complete: ask
    markers.mark("alice")
    markers.complete()
    assert markers.may_have("alice") and not markers.may_have("bob")
    assert markers.may_have("")  # no user: never skipped
    markers.incomplete()
    assert markers.may_have("bob")
    assert "alice" not in "".join(path.name for path in markers.directory.iterdir())  # digests only


def test_start_up_reconciles_with_vault_once_it_answers(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("gone")  # left from before: the user's secrets were deleted by other means
    markers.complete()
    vault = _Vault({"alice": ["API_KEY"], "bob": []}, down_for=2)
    asyncio.run(_keeper(vault, markers).keep_markers(retry_seconds=0.01))
    assert (markers.directory / COMPLETE).is_file()
    assert [markers.may_have(user) for user in ("alice", "bob", "gone")] == [True, False, False]


def test_a_delete_marks_the_user_back_when_a_put_landed_meanwhile(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice")
    markers.complete()
    vault = _Vault({})
    keeper = _keeper(vault, markers)
    vault.names_answers = [[], ["NEW_KEY"]]  # empty at the first look, a put's entry at the second
    keeper._unmark_if_none_left("alice")
    assert markers.may_have("alice")
    vault.names_answers = [[], []]
    keeper._unmark_if_none_left("alice")
    assert not markers.may_have("alice")


@pytest.mark.parametrize("left", [["OTHER"], []])
def test_a_user_with_entries_left_stays_marked(tmp_path: Path, left: list[str]) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice")
    markers.complete()
    _keeper(_Vault({"alice": left}), markers)._unmark_if_none_left("alice")
    assert markers.may_have("alice") == bool(left)


def test_a_delete_keeps_the_user_marked_when_vault_cannot_say(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice")
    markers.complete()

    class Sealed(_Vault):
        def names(self, uid: str) -> list[str]:
            raise Unavailable("vault is sealed")

    _keeper(Sealed({}), markers)._unmark_if_none_left("alice")  # no error: the delete is done
    assert markers.may_have("alice")


def test_a_marker_holds_its_content_whole_and_reconciling_rewrites_it(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers", mode=0o644).create()
    markers.mark("alice", "set-1")
    (markers.directory / ".leftover.partial").write_text("half")  # a write a stop interrupted
    assert markers.path("alice").read_text() == "set-1"
    markers.reconcile({"alice": "set-2", "bob": "set-3"})
    assert sorted(p.read_text() for p in markers.directory.iterdir()) == ["set-2", "set-3"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in markers.directory.iterdir())


def test_listing_an_unmarked_users_secrets_asks_vault_only_while_markers_are_incomplete(
    tmp_path: Path,
) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice")
    asked: list[str] = []

    class Counting(_Vault):
        def names(self, uid: str) -> list[str]:
            asked.append(uid)
            return []

    keeper = _keeper(Counting({}), markers)
    bob = Identity(user_id="bob", email="bob@example.com")
    alice = Identity(user_id="alice", email="alice@example.com")
    assert asyncio.run(keeper.list(bob)) == [] and asked == ["bob"]  # not reconciled yet: asked
    markers.complete()
    assert asyncio.run(keeper.list(bob)) == [] and asyncio.run(keeper.resolve(bob, [], everything=True)) == {}
    assert asked == ["bob"]  # bob has no marker: no call
    assert asyncio.run(keeper.list(alice)) == [] and asked == ["bob", "alice"]  # marked: asked


def test_a_stamp_is_the_markers_content_only_while_markers_are_complete(tmp_path: Path) -> None:
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice", "s1")
    markers.mark("old", "")  # a marker without a stamp cannot tell one state from the next
    assert [markers.stamp(user) for user in ("alice", "bob", "")] == [None, None, None]  # not complete
    markers.complete()
    assert [markers.stamp(user) for user in ("alice", "bob", "old", "")] == ["s1", UNMARKED, None, None]
    markers.mark("alice", new_stamp())
    assert markers.stamp("alice") not in ("s1", UNMARKED, None)


def test_what_is_kept_is_given_back_only_under_the_same_stamp_and_within_its_time() -> None:
    now = [0.0]
    kept: KeptUnderStamp[dict[str, str]] = KeptUnderStamp(len, seconds=30, users=2, clock=lambda: now[0])
    kept.keep("alice", "s1", {"KEY": "v1"})
    assert kept.get("alice", "s1") == {"KEY": "v1"}
    assert kept.get("alice", "s2") is None  # a new stamp: asked again, and forgotten
    assert kept.get("alice", "s1") is None
    kept.keep("alice", "s2", {"KEY": "v2"})
    now[0] = 29.9
    assert kept.get("alice", "s2") == {"KEY": "v2"}
    now[0] = 30.0
    assert kept.get("alice", "s2") is None  # too old, whatever the stamp says
    for user in ("a", "b", "c"):
        kept.keep(user, "s", {})
    assert kept.get("a", "s") is None and kept.get("b", "s") == {} and kept.get("c", "s") == {}


def test_a_stamp_that_cannot_be_written_makes_readers_trust_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged stamp could hide a change from a reader that kept values under it: when the
    new one cannot be written, the markers are marked incomplete and every reader asks."""
    markers = UserMarkers(tmp_path / "markers").create()
    markers.mark("alice", "s1")
    markers.complete()
    keeper = _keeper(_Vault({}), markers)

    def full_disk(user_id: str, content: str = "") -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(markers, "mark", full_disk)
    keeper._restamp("alice")
    assert markers.stamp("alice") is None and markers.stamp("bob") is None
    assert markers.may_have("bob")


def test_what_is_kept_is_bounded_in_bytes_the_least_recent_going_first() -> None:
    kept: KeptUnderStamp[str] = KeptUnderStamp(len, most_bytes=10)
    kept.keep("alice", "s", "aaaa")
    kept.keep("bob", "s", "bbbb")
    assert kept.get("alice", "s") == "aaaa"  # now the most recent
    kept.keep("carol", "s", "cccc")  # 12 bytes: bob, the least recent, goes
    assert [kept.get(user, "s") for user in ("alice", "bob", "carol")] == ["aaaa", None, "cccc"]
    kept.keep("dave", "s", "d" * 11)  # larger than the bound: not kept, nothing else dropped
    assert [kept.get(user, "s") for user in ("alice", "carol", "dave")] == ["aaaa", "cccc", None]
    kept.keep("alice", "s2", "a" * 6)  # replacing counts the new size only: carol (4) + 6 fit
    assert kept.get("alice", "s2") == "a" * 6 and kept.get("carol", "s") == "cccc"
