"""Record: idempotent on record_id (also when retries race), serialized per user, and what it keeps."""

from __future__ import annotations

import asyncio

from google.protobuf.json_format import MessageToDict

from tests.audit.harness import Keys, audit_service, new_user, run


def test_a_retried_record_is_stored_once(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            first = await client.record(user, "secret.put", record_id="req-1:secret.put", resource="secret/A")
            retry = await client.record(user, "secret.put", record_id="req-1:secret.put", resource="secret/A")
            # Even a "retry" that differs gets the stored entry back, and changes nothing.
            odd = await client.record(user, "secret.delete", record_id="req-1:secret.put", outcome="failure")
            entries = await client.all_entries(user)
            verdict = await client.verify(user)
        assert (first.created, retry.created, odd.created) == (True, False, False)
        assert retry.entry == first.entry and odd.entry == first.entry
        assert entries == [first.entry]
        assert (verdict.valid, verdict.entries) == (True, 1)

    run(test)


def test_concurrent_retries_are_stored_once(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await client.record(user, "thing.before")
            responses = await asyncio.gather(
                *(client.record(user, "code.execute", record_id="req-7:execute") for _ in range(16))
            )
            entries = await client.all_entries(user)
            verdict = await client.verify(user)
        assert sum(response.created for response in responses) == 1
        assert {response.entry.id for response in responses} == {entries[0].id}
        assert [entry.action for entry in entries] == ["code.execute", "thing.before"]
        assert (verdict.valid, verdict.entries) == (True, 2)

    run(test)


def test_the_same_record_id_is_separate_for_each_user(keys: Keys, database_url: str) -> None:
    alice, bob = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            for_alice = await client.record(alice, "auth.login", record_id="shared-id")
            for_bob = await client.record(bob, "auth.login", record_id="shared-id")
        assert for_alice.created and for_bob.created
        assert for_alice.entry.id != for_bob.entry.id
        assert for_alice.entry.sequence == for_bob.entry.sequence == 1

    run(test)


def test_concurrent_appends_to_one_chain_are_serialized(keys: Keys, database_url: str) -> None:
    user, other = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await asyncio.gather(
                *(client.record(user, "thing.done") for _ in range(25)),
                *(client.record(other, "thing.done") for _ in range(10)),
            )
            entries = await client.all_entries(user)
            verdicts = [await client.verify(user), await client.verify(other)]
        assert [entry.sequence for entry in entries] == list(range(25, 0, -1))
        for newer, older in zip(entries, entries[1:], strict=False):
            assert newer.prev_hash == older.hash
        assert [(verdict.valid, verdict.entries) for verdict in verdicts] == [(True, 25), (True, 10)]

    run(test)


def test_details_keep_their_values_with_integral_numbers_as_integers(keys: Keys, database_url: str) -> None:
    user = new_user()
    details = {"size": 1234, "ratio": 0.25, "ok": True, "nothing": None, "list": [1, "a"], "name": "ü"}

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            recorded = (await client.record(user, "code.execute", details=details)).entry
            (listed,) = await client.all_entries(user)
        assert listed == recorded
        assert MessageToDict(listed.details) == {
            "size": 1234.0,
            "ratio": 0.25,
            "ok": True,
            "nothing": None,
            "list": [1.0, "a"],
            "name": "ü",
        }

    run(test)


def test_request_metadata_fills_empty_request_id_and_client_ip(keys: Keys, database_url: str) -> None:
    user = new_user()
    metadata = (("x-request-id", "edge-req-9"), ("x-pythonon-client-ip", "192.0.2.44"))

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            filled = (await client.record(user, "auth.login", metadata=metadata)).entry
            explicit = (
                await client.record(
                    user, "auth.login", request_id="own-req", client_ip="198.51.100.2", metadata=metadata
                )
            ).entry
            bare = (await client.record(user, "auth.login")).entry
        assert (filled.request_id, filled.client_ip) == ("edge-req-9", "192.0.2.44")
        assert (explicit.request_id, explicit.client_ip) == ("own-req", "198.51.100.2")
        assert (bare.request_id, bare.client_ip) == ("", "")

    run(test)
