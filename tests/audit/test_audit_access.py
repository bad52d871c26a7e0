"""Whose entries a caller sees, who may call at all, and what the recorder refuses."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pythonon.audit.v1 import audit_pb2

from services.platform.identity import Identity, IdentitySigner, generate_private_key_pem
from services.platform.service_graph import IDENTITY_HEADER
from tests.audit.harness import Keys, audit_service, new_user, run


def stamp(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def test_a_user_never_sees_another_users_entries(keys: Keys, database_url: str) -> None:
    alice, bob = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            for number in range(6):
                await client.record(alice, "secret.put", resource=f"secret/A{number}")
            await client.record(bob, "auth.login")
            await client.record("anonymous", "auth.login", outcome="failure")
            alice_ids = {entry.id for entry in await client.all_entries(alice)}
            alice_cursor = (await client.page(alice, limit=2)).next_cursor
            assert alice_cursor
            seen_by_bob: dict[str, list[str]] = {}
            queries: dict[str, dict[str, Any]] = {
                "everything": {},
                "alice's action": {"action": "secret.put"},
                "alice's cursor": {"cursor": alice_cursor},
                "alice's cursor and action": {"cursor": alice_cursor, "action": "secret.put"},
                "all time": {"since": stamp(0), "until": stamp(int(time.time()) + 3600)},
                "largest page": {"limit": 500},
            }
            for name, query in queries.items():
                seen_by_bob[name] = [
                    entry.resource or entry.action for entry in await client.all_entries(bob, **query)
                ]
            bob_entries = await client.all_entries(bob)
            bob_verdict = await client.verify(bob)
            anonymous = await client.all_entries("anonymous")
        assert len(alice_ids) == 6
        assert seen_by_bob == {
            "everything": ["auth.login"],
            "alice's action": [],
            # Below Alice's position (entry 5) Bob finds only his own entry 1.
            "alice's cursor": ["auth.login"],
            "alice's cursor and action": [],
            "all time": ["auth.login"],
            "largest page": ["auth.login"],
        }
        assert not alice_ids & {entry.id for entry in bob_entries}
        assert [entry.sequence for entry in bob_entries] == [1]
        assert (bob_verdict.valid, bob_verdict.entries) == (True, 1)
        # Events with no known user form a chain of their own, like any user's.
        assert [(entry.sequence, entry.outcome) for entry in anonymous] == [(1, "failure")]

    run(test)


def test_alices_cursor_only_pages_through_bobs_own_entries(keys: Keys, database_url: str) -> None:
    """A cursor names a position, not a user: Bob's page below Alice's position holds Bob's entries."""
    alice, bob = new_user(), new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            for _ in range(5):
                await client.record(alice, "alice.did")
                await client.record(bob, "bob.did")
            alice_cursor = (await client.page(alice, limit=2)).next_cursor
            page = await client.page(bob, cursor=alice_cursor)
        assert [(entry.sequence, entry.action) for entry in page.entries] == [
            (3, "bob.did"),
            (2, "bob.did"),
            (1, "bob.did"),
        ]

    run(test)


@pytest.mark.parametrize("method", ["ListEntries", "VerifyChain", "Record"])
def test_calls_without_a_valid_identity_are_refused(keys: Keys, database_url: str, method: str) -> None:
    user = new_user()
    stranger = IdentitySigner(generate_private_key_pem())
    requests = {
        "ListEntries": audit_pb2.ListEntriesRequest(),
        "VerifyChain": audit_pb2.VerifyChainRequest(),
        "Record": audit_pb2.RecordRequest(record_id="r1", action="thing.done", outcome="success"),
    }
    expired = keys.signer.sign(Identity(user, "u@example.com"), now=time.time() - 3600)
    refusals = {
        "no assertion": (),
        "garbage": ((IDENTITY_HEADER, "not-a-jwt"),),
        "signed by another key": ((IDENTITY_HEADER, stranger.sign(Identity(user, "u@example.com"))),),
        "expired": ((IDENTITY_HEADER, expired),),
    }

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            stub = client.recorder if method == "Record" else client.audit
            call = getattr(stub, method)
            codes = {}
            for name, metadata in refusals.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(requests[method], metadata=metadata, timeout=10)
                codes[name] = refused.value.code()
            accepted = await call(requests[method], metadata=client.identity(user), timeout=10)
            entries = await client.all_entries(user)
        assert codes == dict.fromkeys(refusals, grpc.StatusCode.UNAUTHENTICATED)
        assert accepted is not None
        # Only the one accepted Record call stored anything.
        assert len(entries) == (1 if method == "Record" else 0)

    run(test)


LONG_DETAILS = {"blob": "x" * (8 * 1024)}


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"action": ""}, "action is required"),
        ({"action": "Auth.Login"}, "action must be"),
        ({"action": "a"}, "action must be"),
        ({"action": "1auth"}, "action must be"),
        ({"action": "auth login"}, "action must be"),
        ({"action": "a" * 65}, "action must be"),
        ({"outcome": ""}, "outcome must be one of success, failure, denied, cancelled"),
        ({"outcome": "ok"}, "outcome must be one of success, failure, denied, cancelled"),
        ({"resource": "r" * 257}, "resource must be at most 256 characters"),
        ({"record_id": ""}, "record_id is required"),
        ({"record_id": "k" * 129}, "record_id must be at most 128 characters"),
        ({"request_id": "q" * 129}, "request_id must be at most 128 characters"),
        ({"client_ip": "1" * 65}, "client_ip must be at most 64 characters"),
        ({"details": LONG_DETAILS}, "details must be at most 8192 bytes"),
        ({"details": {"n": float("nan")}}, "numbers must be finite"),
        ({"details": {"n": [float("inf")]}}, "numbers must be finite"),
    ],
)
def test_invalid_records_are_refused_and_store_nothing(
    keys: Keys, database_url: str, fields: dict[str, Any], complaint: str
) -> None:
    user = new_user()
    request: dict[str, Any] = {"record_id": "r1", "action": "thing.done", "outcome": "success", **fields}
    details = request.pop("details", None)

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            message = audit_pb2.RecordRequest(**request)
            if details is not None:
                message.details.update(details)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.recorder.Record(message, metadata=client.identity(user), timeout=10)
            entries = await client.all_entries(user)
            verdict = await client.verify(user)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert complaint in (refused.value.details() or "")
        assert entries == []
        assert (verdict.valid, verdict.entries) == (True, 0)

    run(test)


def test_the_limits_themselves_are_accepted(keys: Keys, database_url: str) -> None:
    user = new_user()
    # {"blob":"..."} is 11 bytes of JSON around the string.
    largest_details = {"blob": "x" * (8 * 1024 - 11)}

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            response = await client.record(
                user,
                "a" * 64,
                record_id="k" * 128,
                resource="r" * 256,
                outcome="denied",
                request_id="q" * 128,
                client_ip="1" * 64,
                details=largest_details,
            )
            short = await client.record(user, "ab", outcome="failure")
            verdict = await client.verify(user)
        assert response.created and response.entry.sequence == 1
        assert short.created and short.entry.action == "ab"
        assert (verdict.valid, verdict.entries) == (True, 2)

    run(test)
