"""The hash chain: entries come back newest first and linked, a client can recompute every hash
from the entry JSON alone, and VerifyChain catches entries altered, removed or reordered directly in
the database."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from google.protobuf.json_format import MessageToDict

from services.audit import storage
from services.audit.chain import entry_hash
from services.audit.models import ChainHead, Entry
from tests.audit.harness import AuditClient, Keys, audit_service, new_user, query, run, tamper

ZERO_HASH = "0" * 64


def client_side_hash(entry: dict[str, Any]) -> str:
    """The README's recipe, written independently of the service, over an entry's JSON."""

    def normalized(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {key: normalized(item) for key, item in value.items()}
        if isinstance(value, list):
            return [normalized(item) for item in value]
        return value

    document = {
        "id": entry["id"],
        "sequence": entry["sequence"],
        "timestamp": entry["timestamp"],
        "action": entry["action"],
        "resource": entry.get("resource", ""),
        "outcome": entry["outcome"],
        "requestId": entry.get("requestId", ""),
        "clientIp": entry.get("clientIp", ""),
        "details": normalized(entry.get("details", {})),
        "prevHash": entry["prevHash"],
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def record_five(client: AuditClient, user: str) -> None:
    for number in range(1, 6):
        await client.record(user, f"step.n{number}", resource=f"thing/{number}", details={"n": number})


def entry_where(user: str, sequence: int) -> Any:
    return sa.and_(Entry.user_id == user, Entry.sequence == sequence)


async def verdict_after(
    client: AuditClient, database_url: str, user: str, *statements: Any
) -> tuple[bool, int, int, str]:
    """The chain verifies before the tampering; the answer after it."""
    intact = await client.verify(user)
    assert (intact.valid, intact.entries, intact.broken_at_sequence) == (True, 5, 0)
    tamper(database_url, *statements)
    broken = await client.verify(user)
    return broken.valid, broken.entries, broken.broken_at_sequence, broken.message


def test_entries_come_back_newest_first_and_linked(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            recorded = [
                (
                    await client.record(
                        user,
                        f"step.n{number}",
                        resource=f"thing/{number}",
                        request_id=f"req-{number}",
                        client_ip="203.0.113.7",
                        details={"n": number},
                    )
                ).entry
                for number in range(1, 5)
            ]
            listed = list((await client.page(user)).entries)
        assert listed == recorded[::-1]
        assert [entry.sequence for entry in listed] == [4, 3, 2, 1]
        assert [entry.action for entry in listed] == ["step.n4", "step.n3", "step.n2", "step.n1"]
        oldest = listed[-1]
        assert (oldest.resource, oldest.outcome, oldest.request_id, oldest.client_ip) == (
            "thing/1",
            "success",
            "req-1",
            "203.0.113.7",
        )
        assert MessageToDict(oldest.details) == {"n": 1.0}
        assert oldest.prev_hash == ZERO_HASH
        for newer, older in zip(listed, listed[1:], strict=False):
            assert newer.prev_hash == older.hash
        assert len({entry.hash for entry in listed}) == 4
        assert listed[0].timestamp.ToDatetime() >= listed[-1].timestamp.ToDatetime()

    run(test)


def test_a_client_recomputes_every_hash_from_the_entry_json(keys: Keys, database_url: str) -> None:
    user = new_user()
    details: dict[str, Any] = {
        "language": "python",
        "size": 1234,
        "exitCode": 0,
        "ratio": 0.1,
        "half": 2.5,
        "big": 1e15,
        "ok": True,
        "none": None,
        "nested": {"z": [1, "two", {"b": False, "a": -3}], "a": "ü ✓ 日本"},
        "empty": {},
    }

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await client.record(user, "code.execute", resource="execution/1", details=details)
            await client.record(user, "auth.login", client_ip="2001:db8::1", request_id="r-2")
            await client.record(user, "secret.put", resource="secret/API_TOKEN")
            entries = [MessageToDict(entry) for entry in (await client.page(user)).entries]
        assert len(entries) == 3
        for entry in entries:
            assert entry["hash"] == client_side_hash(entry), entry
        # The JSON shape the recipe reads: details always present, fields under their JSON names.
        oldest = entries[-1]
        assert oldest["details"]["nested"]["a"] == "ü ✓ 日本"
        assert entries[0]["details"] == {}
        assert entries[1]["clientIp"] == "2001:db8::1" and entries[1]["requestId"] == "r-2"
        assert oldest["prevHash"] == ZERO_HASH
        assert oldest["timestamp"].endswith("Z")

    run(test)


def test_an_intact_chain_verifies_and_names_its_head(keys: Keys, database_url: str) -> None:
    user, nobody = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            newest = (await client.page(user, limit=1)).entries[0]
            verdict = await client.verify(user)
            empty = await client.verify(nobody)
        assert (verdict.valid, verdict.entries, verdict.broken_at_sequence) == (True, 5, 0)
        assert verdict.head_hash == newest.hash
        assert verdict.message == "all 5 entries verify"
        assert (empty.valid, empty.entries, empty.head_hash) == (True, 0, "")

    run(test)


@pytest.mark.parametrize(
    "column",
    [
        "id",
        "timestamp",
        "action",
        "resource",
        "outcome",
        "request_id",
        "client_ip",
        "details",
        "prev_hash",
        "hash",
    ],
)
def test_verify_catches_any_altered_column(keys: Keys, database_url: str, column: str) -> None:
    user = new_user()
    changes: dict[str, Any] = {
        "id": "00000000-0000-4000-8000-000000000000",
        "action": "step.other",
        "resource": "thing/other",
        "outcome": "failure",
        "request_id": "forged",
        "client_ip": "198.51.100.1",
        "details": {"n": 33},
        "prev_hash": "f" * 64,
        "hash": "e" * 64,
    }

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            ((value,),) = query(database_url, sa.select(getattr(Entry, column)).where(entry_where(user, 3)))
            # A microsecond is enough: the hash covers the timestamp exactly as the API prints it.
            forged = value + timedelta(microseconds=1) if column == "timestamp" else changes[column]
            verdict = await verdict_after(
                client,
                database_url,
                user,
                sa.update(Entry).where(entry_where(user, 3)).values({column: forged}),
            )
        assert verdict == (False, 2, 3, "entry 3 was altered")

    run(test)


def test_verify_catches_an_entry_rewritten_with_a_recomputed_hash(keys: Keys, database_url: str) -> None:
    """Someone who knows the recipe rewrites entry 3 and its hash: entry 4 no longer follows it."""
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            third = next(e for e in (await client.page(user)).entries if e.sequence == 3)
            rewritten = entry_hash(
                entry_id=third.id,
                sequence=3,
                timestamp=third.timestamp.ToDatetime(),
                action=third.action,
                resource="thing/innocent",
                outcome=third.outcome,
                request_id=third.request_id,
                client_ip=third.client_ip,
                details=MessageToDict(third.details),
                prev_hash=third.prev_hash,
            )
            verdict = await verdict_after(
                client,
                database_url,
                user,
                sa.update(Entry)
                .where(entry_where(user, 3))
                .values(resource="thing/innocent", hash=rewritten),
            )
        assert verdict == (
            False,
            3,
            4,
            "entry 4 does not follow entry 3: an earlier entry was rewritten or replaced",
        )

    run(test)


def test_verify_catches_a_deleted_middle_entry(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            verdict = await verdict_after(
                client, database_url, user, sa.delete(Entry).where(entry_where(user, 2))
            )
        assert verdict == (False, 1, 2, "entry 2 is missing")

    run(test)


def test_verify_catches_a_deleted_newest_entry(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            newest = (await client.page(user, limit=1)).entries[0]
            verdict = await verdict_after(
                client, database_url, user, sa.delete(Entry).where(entry_where(user, 5))
            )
            head_hash = (await client.verify(user)).head_hash
        assert verdict == (False, 4, 5, "the newest entry was removed")
        # The head still names the removed entry.
        assert head_hash == newest.hash

    run(test)


def test_verify_catches_the_newest_entries_removed_with_the_head_moved_back(
    keys: Keys, database_url: str
) -> None:
    """Deleting the newest entries and pointing the head at entry 3 hides them from the service;
    the headHash a client kept shows it (the documented limit of a keyless chain)."""
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            kept_head = (await client.verify(user)).head_hash
            third = next(e for e in (await client.page(user)).entries if e.sequence == 3)
            tamper(
                database_url,
                sa.delete(Entry).where(Entry.user_id == user, Entry.sequence > 3),
                sa.update(ChainHead)
                .where(ChainHead.user_id == user)
                .values(last_sequence=3, last_hash=third.hash),
            )
            verdict = await client.verify(user)
        assert verdict.valid and verdict.entries == 3
        assert verdict.head_hash != kept_head

    run(test)


def test_verify_catches_the_newest_entry_replaced(keys: Keys, database_url: str) -> None:
    """Entry 5 rewritten with a recomputed hash: no later entry links to it, but the head does."""
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            newest = (await client.page(user, limit=1)).entries[0]
            rewritten = entry_hash(
                entry_id=newest.id,
                sequence=5,
                timestamp=newest.timestamp.ToDatetime(),
                action="step.harmless",
                resource=newest.resource,
                outcome=newest.outcome,
                request_id=newest.request_id,
                client_ip=newest.client_ip,
                details=MessageToDict(newest.details),
                prev_hash=newest.prev_hash,
            )
            verdict = await verdict_after(
                client,
                database_url,
                user,
                sa.update(Entry).where(entry_where(user, 5)).values(action="step.harmless", hash=rewritten),
            )
        assert verdict == (False, 5, 5, "entry 5 was replaced")

    run(test)


def test_verify_catches_two_entries_swapped(keys: Keys, database_url: str) -> None:
    """Entries 2 and 3 trade places (every column but the position moves with them)."""
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            verdict = await verdict_after(
                client,
                database_url,
                user,
                sa.update(Entry).where(entry_where(user, 2)).values(sequence=-2),
                sa.update(Entry).where(entry_where(user, 3)).values(sequence=2),
                sa.update(Entry).where(entry_where(user, -2)).values(sequence=3),
            )
            listed = [entry.action for entry in (await client.page(user)).entries]
        assert listed == ["step.n5", "step.n4", "step.n2", "step.n3", "step.n1"]
        assert verdict == (False, 1, 2, "entry 2 was recorded as entry 3: the entries were reordered")

    run(test)


def test_verify_catches_an_entry_added_past_the_head(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            newest = (await client.page(user, limit=1)).entries[0]
            (row,) = query(database_url, sa.select(Entry).where(entry_where(user, 5)))
            values = {key: getattr(row, key) for key in row._fields}
            forged = {
                **values,
                "id": "00000000-0000-4000-8000-000000000006",
                "sequence": 6,
                "record_id": "forged",
                "prev_hash": newest.hash,
            }
            forged["hash"] = entry_hash(
                entry_id=forged["id"],
                sequence=6,
                timestamp=forged["timestamp"],
                action=forged["action"],
                resource=forged["resource"],
                outcome=forged["outcome"],
                request_id=forged["request_id"],
                client_ip=forged["client_ip"],
                details=forged["details"],
                prev_hash=forged["prev_hash"],
            )
            verdict = await verdict_after(client, database_url, user, sa.insert(Entry).values(forged))
        assert verdict == (False, 6, 6, "entries were added after the chain head, outside the log")

    run(test)


def test_verify_walks_long_chains_in_batches(
    keys: Keys, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "CHAIN_BATCH", 2)
    user, other = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)
            await record_five(client, other)
            intact = await client.verify(user)
            # Entry 3 opens the second batch.
            tamper(database_url, sa.delete(Entry).where(entry_where(user, 3)))
            broken = await client.verify(user)
        assert (intact.valid, intact.entries) == (True, 5)
        assert (broken.valid, broken.broken_at_sequence, broken.message) == (False, 3, "entry 3 is missing")

    run(test)


def test_the_database_refuses_to_change_or_delete_entries(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_five(client, user)

    run(test)
    statements: list[Any] = [
        sa.update(Entry).where(entry_where(user, 2)).values(resource="thing/innocent"),
        sa.delete(Entry).where(entry_where(user, 2)),
    ]
    if database_url.startswith("postgresql"):
        statements.append(sa.text("TRUNCATE audit_entries"))
    for statement in statements:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            query(database_url, statement)
    assert [row.resource for row in query(database_url, sa.select(Entry).where(entry_where(user, 2)))] == [
        "thing/2"
    ]
