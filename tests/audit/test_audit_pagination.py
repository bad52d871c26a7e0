"""ListEntries: newest first, keyset pages that stay stable while entries are appended, filters,
limits and cursors."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.audit.harness import MAX_PAGES, AuditClient, Keys, audit_service, new_user, run


async def record_many(client: AuditClient, user: str, count: int, action: str = "thing.done") -> None:
    for _ in range(count):
        await client.record(user, action)


def test_pages_stay_stable_while_entries_are_appended_between_them(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_many(client, user, 20)
            seen: list[int] = []
            ids: list[str] = []
            cursor = ""
            pages = 0
            while pages < MAX_PAGES:
                page = await client.page(user, limit=3, cursor=cursor)
                seen.extend(entry.sequence for entry in page.entries)
                ids.extend(entry.id for entry in page.entries)
                pages += 1
                # Newer entries arrive between every two pages (offset paging would repeat entries).
                await record_many(client, user, 4)
                if not page.next_cursor:
                    break
                cursor = page.next_cursor
            total = len(await client.all_entries(user, limit=500))
        assert seen == list(range(20, 0, -1))
        assert len(set(ids)) == 20
        assert pages == 7
        assert total == 20 + 4 * pages

    run(test)


def test_pages_stay_stable_under_concurrent_appends(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_many(client, user, 30)
            appending = asyncio.Event()

            async def writer() -> None:
                appending.set()
                await asyncio.gather(*(client.record(user, "thing.later") for _ in range(40)))

            async def reader() -> list[int]:
                await appending.wait()
                sequences: list[int] = []
                cursor = ""
                for _ in range(MAX_PAGES):
                    page = await client.page(user, limit=2, cursor=cursor)
                    sequences.extend(entry.sequence for entry in page.entries)
                    if not page.next_cursor:
                        break
                    cursor = page.next_cursor
                return sequences

            _, seen = await asyncio.gather(writer(), reader())
            everything = await client.all_entries(user, limit=500)
            verdict = await client.verify(user)
        newest_seen = seen[0]
        assert newest_seen >= 30
        # Exactly the entries that existed when the first page was read, each once, in order.
        assert seen == list(range(newest_seen, 0, -1))
        assert [entry.sequence for entry in everything] == list(range(70, 0, -1))
        assert (verdict.valid, verdict.entries) == (True, 70)

    run(test)


def test_the_page_size_defaults_and_limits(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url, page_size=3, max_page_size=5) as client:
            await record_many(client, user, 7)
            default = await client.page(user)
            largest = await client.page(user, limit=5)
            exact = await client.page(user, limit=7 - 5, cursor=largest.next_cursor)
            codes = []
            for limit in (-1, 6):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.page(user, limit=limit)
                codes.append((refused.value.code(), refused.value.details()))
        assert [entry.sequence for entry in default.entries] == [7, 6, 5]
        assert default.next_cursor
        assert [entry.sequence for entry in largest.entries] == [7, 6, 5, 4, 3]
        # The last page is exactly full: no cursor to an empty page.
        assert [entry.sequence for entry in exact.entries] == [2, 1]
        assert exact.next_cursor == ""
        refusal = "limit must be between 1 and 5 (0 for the default)"
        assert codes == [(grpc.StatusCode.INVALID_ARGUMENT, refusal)] * 2

    run(test)


def test_filter_by_action_across_pages(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            for _ in range(5):
                await client.record(user, "secret.put")
                await client.record(user, "code.execute")
            puts = await client.all_entries(user, action="secret.put", limit=2)
            first = await client.page(user, action="secret.put", limit=2)
            nothing = await client.all_entries(user, action="secret.delete")
        assert [entry.sequence for entry in puts] == [9, 7, 5, 3, 1]
        assert {entry.action for entry in puts} == {"secret.put"}
        assert len(first.entries) == 2 and first.next_cursor
        assert nothing == []

    run(test)


def test_filter_by_time_range(keys: Keys, database_url: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            stamps: list[Timestamp] = []
            for _ in range(3):
                stamps.append((await client.record(user, "thing.done")).entry.timestamp)
                await asyncio.sleep(0.005)
            first, second, third = stamps

            async def sequences(**query: Any) -> list[int]:
                return [entry.sequence for entry in await client.all_entries(user, **query)]

            answers = {
                "since second": await sequences(since=second),
                "until second": await sequences(until=second),
                "second only": await sequences(since=second, until=third),
                "empty range": await sequences(since=second, until=second),
                "since after third": await sequences(since=Timestamp(seconds=third.seconds + 1)),
            }
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.page(user, since=third, until=first)
        assert first.ToDatetime() < second.ToDatetime() < third.ToDatetime()
        assert answers == {
            "since second": [3, 2],
            "until second": [1],
            "second only": [2],
            "empty range": [],
            "since after third": [],
        }
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "since must not be after until"

    run(test)


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        b64("seq:0"),
        b64("seq:-1"),
        b64("seq:abc"),
        b64("seq:99999999999"),
        b64("sequence:3"),
        b64("3"),
        "c" * 100,
    ],
)
def test_a_malformed_cursor_is_refused(keys: Keys, database_url: str, cursor: str) -> None:
    user = new_user()

    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            await record_many(client, user, 3)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.page(user, cursor=cursor)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "cursor is malformed; pass the nextCursor of a previous page"

    run(test)


@pytest.mark.parametrize("action", ["Secret.Put", "x", "secret put", "a" * 65])
def test_a_malformed_action_filter_is_refused(keys: Keys, database_url: str, action: str) -> None:
    async def test() -> None:
        async with audit_service(keys, database_url) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.page(new_user(), action=action)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(test)
