"""The secrets service in-process on port 0 against a real OpenBao: the lifecycle, the refusals, the
isolation between users, the audit records (and what happens when they cannot be written), Vault
sealed or unreachable, and the runner's setup of OpenBao (keys 0600, a policy-limited token)."""

from __future__ import annotations

import asyncio
import logging
import re
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import hvac
import hvac.exceptions
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from pythonon.secrets.v1 import secrets_pb2
from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform.audit import CHANGE_KEPT_UNRECORDED
from services.platform.bootstrap import start_server
from services.platform.identity import Identity
from services.platform.service_graph import HTTP_STATUS_HEADER
from services.platform.settings import Environment, SettingsError, ephemeral_server_settings
from services.platform.user_markers import COMPLETE, UNMARKED, UserMarkers
from services.runner import openbao
from services.secrets.settings import SecretsSettings
from services.secrets.vault import UNAVAILABLE_MESSAGE, VaultSecretStore, parse_time
from services.system.service import build as build_system
from services.system.settings import SystemSettings, parse_vault_address
from tests.secrets.conftest import (
    Keys,
    OpenBao,
    Service,
    free_port,
    new_user,
    run,
    secrets_service,
    start_openbao,
    stop_openbao,
    vault_settings,
)

VALUE = "s3cr3t-VALUE-" + uuid.uuid4().hex


async def put(
    svc: Service, user: Identity, name: str, value: str = VALUE, description: str = ""
) -> secrets_pb2.SecretMetadata:
    request = secrets_pb2.PutSecretRequest(
        name=name, secret=secrets_pb2.SecretInput(value=value, description=description)
    )
    return await svc.public.PutSecret(request, metadata=svc.as_user(user), timeout=10)


async def delete(svc: Service, user: Identity, name: str) -> secrets_pb2.DeleteSecretResponse:
    request = secrets_pb2.DeleteSecretRequest(name=name)
    return await svc.public.DeleteSecret(request, metadata=svc.as_user(user), timeout=10)


async def listed(svc: Service, user: Identity) -> list[secrets_pb2.SecretMetadata]:
    response = await svc.public.ListSecrets(
        secrets_pb2.ListSecretsRequest(), metadata=svc.as_user(user), timeout=10
    )
    return list(response.secrets)


async def resolve(svc: Service, user: Identity, *names: str, everything: bool = False) -> dict[str, str]:
    request = secrets_pb2.ResolveSecretsRequest(names=list(names), all=everything)
    response = await svc.resolver.ResolveSecrets(request, metadata=svc.as_user(user), timeout=10)
    return dict(response.values)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


def with_service(
    bao: OpenBao, keys: Keys, test: Callable[[Service], Awaitable[None]], **options: Any
) -> None:
    async def body() -> None:
        async with secrets_service(keys, options.pop("vault", None) or vault_settings(bao), **options) as svc:
            await test(svc)

    run(body())


def close_to_now(stamp: Any) -> bool:
    return abs(stamp.ToDatetime(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=30)


# -- the lifecycle ---------------------------------------------------------------------------------


def test_put_put_list_delete_delete(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        first = await put(svc, user, "API_TOKEN", description="the API's token")
        assert (first.name, first.description, first.version) == ("API_TOKEN", "the API's token", 1)
        assert first.created_at == first.updated_at and close_to_now(first.created_at)

        second = await put(svc, user, "API_TOKEN", value="another value", description="rotated")
        assert (second.name, second.description, second.version) == ("API_TOKEN", "rotated", 2)
        # The replaced value is destroyed in Vault, not kept as an old version.
        versions = bao.root_client().secrets.kv.v2.read_secret_metadata(
            path=f"pythonon/users/{user.user_id}/API_TOKEN", mount_point="secret"
        )["data"]["versions"]
        assert versions["1"]["destroyed"] is True and versions["2"]["destroyed"] is False
        assert second.created_at == first.created_at
        assert second.updated_at.ToDatetime() > first.updated_at.ToDatetime()

        await put(svc, user, "A_FIRST")
        secrets = await listed(svc, user)
        # Sorted by name ("P" sorts before "_").
        assert [(s.name, s.description, s.version) for s in secrets] == [
            ("API_TOKEN", "rotated", 2),
            ("A_FIRST", "", 1),
        ]
        assert secrets[0] == second

        assert await resolve(svc, user, "API_TOKEN", "A_FIRST") == {
            "API_TOKEN": "another value",
            "A_FIRST": VALUE,
        }
        assert await delete(svc, user, "API_TOKEN") == secrets_pb2.DeleteSecretResponse()
        assert await refused(delete(svc, user, "API_TOKEN")) == (
            grpc.StatusCode.NOT_FOUND,
            "no secret named API_TOKEN",
        )
        assert [s.name for s in await listed(svc, user)] == ["A_FIRST"]

        # Deleted for good: the name starts again at version 1, and Vault keeps no old version.
        again = await put(svc, user, "API_TOKEN")
        assert again.version == 1 and again.created_at.ToDatetime() > first.created_at.ToDatetime()
        metadata = bao.root_client().secrets.kv.v2.read_secret_metadata(
            path=f"pythonon/users/{user.user_id}/API_TOKEN", mount_point="secret"
        )
        assert list(metadata["data"]["versions"]) == ["1"]

        assert svc.audit.of(user) == [
            ("secrets.put", "secret/API_TOKEN", {"version": 1.0}),
            ("secrets.put", "secret/API_TOKEN", {"version": 2.0}),
            ("secrets.put", "secret/A_FIRST", {"version": 1.0}),
            ("secrets.delete", "secret/API_TOKEN", {"version": 2.0}),
            ("secrets.put", "secret/API_TOKEN", {"version": 1.0}),
        ]
        assert {r["outcome"] for r in svc.audit.records} == {"success"}

    with_service(bao, keys, test)


def test_values_are_stored_in_vault_under_the_users_own_path(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        await put(svc, user, "DB_PASSWORD", description="prod db")
        stored = bao.root_client().secrets.kv.v2.read_secret_version(
            path=f"pythonon/users/{user.user_id}/DB_PASSWORD",
            mount_point="secret",
            raise_on_deleted_version=True,
        )
        assert stored["data"]["data"] == {"value": VALUE, "description": "prod db"}

    with_service(bao, keys, test)


def test_an_empty_list_and_resolving_nothing(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        assert await listed(svc, user) == []
        assert await resolve(svc, user) == {}
        assert await resolve(svc, user, everything=True) == {}

    with_service(bao, keys, test)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "a secret name is required"),
        ("api_token", "environment-variable name"),
        ("1TOKEN", "environment-variable name"),
        ("API-TOKEN", "environment-variable name"),
        ("API TOKEN", "environment-variable name"),
        ("ÄPI", "environment-variable name"),
        ("A" * 65, "at most 64 characters"),
        ("PATH", "PATH is reserved"),
        ("HOME", "HOME is reserved"),
        ("PYTHONPATH", "PYTHONPATH is reserved"),
        ("LD_PRELOAD", "LD_PRELOAD is reserved"),
        ("BASH_ENV", "BASH_ENV is reserved"),
        ("PYTHONSTARTUP", "starting with PYTHON are reserved"),
        ("PYTHONON_ANYTHING", "starting with PYTHONON_ are reserved"),
        ("LD_AUDIT", "starting with LD_ are reserved"),
    ],
)
def test_names_that_are_not_allowed_are_refused_with_400(
    bao: OpenBao, keys: Keys, name: str, message: str
) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        for call in (put(svc, user, name), delete(svc, user, name), resolve(svc, user, name)):
            code, details = await refused(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert message in details
        assert await listed(svc, user) == []
        assert svc.audit.records == []

    with_service(bao, keys, test)


def test_a_64_character_name_is_fine(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        assert (await put(svc, new_user(), "_" + "A" * 63)).version == 1

    with_service(bao, keys, test)


def test_values_and_descriptions_are_bounded(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        assert (await put(svc, user, "EXACTLY", value="é" * 50)).version == 1  # 100 bytes in UTF-8
        cases = [
            (put(svc, user, "TOO_BIG", value="é" * 51), "at most 100 bytes (UTF-8); this one is 102 bytes"),
            (put(svc, user, "EMPTY", value=""), "a secret value is required"),
            (put(svc, user, "NUL", value="a\x00b"), "cannot contain NUL"),
            (put(svc, user, "DESCRIBED", description="d" * 1025), "description is at most 1024"),
        ]
        for call, message in cases:
            code, details = await refused(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert message in details
        assert [s.name for s in await listed(svc, user)] == ["EXACTLY"]

    with_service(bao, keys, test, max_value_bytes=100)


def test_the_number_of_secrets_per_user_is_bounded(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user, other = new_user(), new_user()
        for name in ("ONE", "TWO", "THREE"):
            await put(svc, user, name)
        code, details = await refused(put(svc, user, "FOUR"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "you already have 3 secrets, the most allowed; delete one to add another"
        # Updating one at the cap is fine, another user is not affected, and a delete frees a place.
        assert (await put(svc, user, "TWO")).version == 2
        assert (await put(svc, other, "FOUR")).version == 1
        await delete(svc, user, "ONE")
        assert (await put(svc, user, "FOUR")).version == 1
        assert sorted(s.name for s in await listed(svc, user)) == ["FOUR", "THREE", "TWO"]

    with_service(bao, keys, test, max_secrets_per_user=3)


def test_calls_without_a_valid_identity_assertion_are_refused(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        request = secrets_pb2.ResolveSecretsRequest(all=True)
        for metadata in ((), (("x-pythonon-identity", "forged"),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await svc.resolver.ResolveSecrets(request, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await svc.public.ListSecrets(secrets_pb2.ListSecretsRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with_service(bao, keys, test)


# -- isolation -------------------------------------------------------------------------------------


def test_one_user_can_never_read_list_overwrite_or_delete_anothers_secrets(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        alice, bob = new_user(), new_user()
        await put(svc, alice, "SHARED_NAME", value="alice's value", description="alice")
        await put(svc, alice, "ALICE_ONLY", value="alice's other value")

        assert await listed(svc, bob) == []
        assert await resolve(svc, bob, everything=True) == {}
        assert await refused(resolve(svc, bob, "ALICE_ONLY")) == (
            grpc.StatusCode.NOT_FOUND,
            "no secret named ALICE_ONLY",
        )
        assert (await refused(delete(svc, bob, "ALICE_ONLY")))[0] == grpc.StatusCode.NOT_FOUND

        # Bob's secret of the same name is his own, at his own version 1.
        assert (await put(svc, bob, "SHARED_NAME", value="bob's value", description="bob")).version == 1
        assert await resolve(svc, bob, everything=True) == {"SHARED_NAME": "bob's value"}
        await delete(svc, bob, "SHARED_NAME")

        alices = await listed(svc, alice)
        assert [(s.name, s.description, s.version) for s in alices] == [
            ("ALICE_ONLY", "", 1),
            ("SHARED_NAME", "alice", 1),
        ]
        assert await resolve(svc, alice, everything=True) == {
            "ALICE_ONLY": "alice's other value",
            "SHARED_NAME": "alice's value",
        }
        assert [a for a, _, _ in svc.audit.of(bob)] == ["secrets.put", "secrets.delete"]

    with_service(bao, keys, test)


def test_resolve_names_the_first_missing_secret(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        await put(svc, user, "PRESENT")
        assert await resolve(svc, user, "PRESENT", "PRESENT") == {"PRESENT": VALUE}
        assert await refused(resolve(svc, user, "PRESENT", "MISSING_ONE", "MISSING_TWO")) == (
            grpc.StatusCode.NOT_FOUND,
            "no secret named MISSING_ONE",
        )
        # `all` ignores names.
        assert await resolve(svc, user, "MISSING_ONE", everything=True) == {"PRESENT": VALUE}

    with_service(bao, keys, test)


# -- the audit log ---------------------------------------------------------------------------------


def test_no_value_ever_reaches_a_response_an_audit_record_or_a_log_line(
    bao: OpenBao, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def test(svc: Service) -> None:
        user = new_user()
        responses = [
            await put(svc, user, "HIDDEN", description="kept"),
            await put(svc, user, "HIDDEN"),
            secrets_pb2.ListSecretsResponse(secrets=await listed(svc, user)),
            await delete(svc, user, "HIDDEN"),
        ]
        for response in responses:
            assert VALUE.encode() not in response.SerializeToString()
        assert svc.audit.records and all(VALUE.encode() not in r["raw"] for r in svc.audit.records)
        svc.audit.failing = True
        await refused(put(svc, user, "HIDDEN"))

    with_service(bao, keys, test)
    assert caplog.records
    assert all(
        VALUE not in record.getMessage() and VALUE not in str(vars(record)) for record in caplog.records
    )


def test_nothing_changes_when_the_audit_log_cannot_record_it(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        await put(svc, user, "KEPT", value="original", description="v1")
        svc.audit.failing = True

        message = "the audit log is unavailable, so the request was not carried out; retry later"
        assert await refused(put(svc, user, "NEW_ONE")) == (grpc.StatusCode.UNAVAILABLE, message)
        assert await refused(put(svc, user, "KEPT", value="changed")) == (
            grpc.StatusCode.UNAVAILABLE,
            message,
        )
        assert await refused(delete(svc, user, "KEPT")) == (grpc.StatusCode.UNAVAILABLE, message)

        assert await resolve(svc, user, everything=True) == {"KEPT": "original"}
        [kept] = await listed(svc, user)
        assert kept.description == "v1"
        # The unrecorded version's value was destroyed, not merely superseded.
        metadata = bao.root_client().secrets.kv.v2.read_secret_metadata(
            path=f"pythonon/users/{user.user_id}/KEPT", mount_point="secret"
        )
        versions = metadata["data"]["versions"]
        assert versions["2"]["destroyed"] is True and not versions["3"]["deletion_time"]

        svc.audit.failing = False
        assert (await put(svc, user, "KEPT", value="changed")).version == kept.version + 1
        assert await resolve(svc, user, "KEPT") == {"KEPT": "changed"}
        assert [action for action, _, _ in svc.audit.of(user)] == ["secrets.put", "secrets.put"]

    with_service(bao, keys, test)


def test_a_change_that_can_be_neither_recorded_nor_undone_is_answered_as_kept_and_logged(
    bao: OpenBao, keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit log refuses the record and Vault then refuses the undo: the answer says the change
    was carried out but is not in the audit log (not "not carried out"), and the service's log says
    so for the operator, naming the secret but not its value."""

    def vault_refuses(*_args: object, **_kwargs: object) -> None:
        raise hvac.exceptions.VaultError("sealed")

    async def test(svc: Service) -> None:
        user = new_user()
        await put(svc, user, "KEPT", value="original")
        svc.audit.failing = True
        monkeypatch.setattr(VaultSecretStore, "purge", vault_refuses)
        monkeypatch.setattr(VaultSecretStore, "revert", vault_refuses)
        kept = (grpc.StatusCode.UNAVAILABLE, CHANGE_KEPT_UNRECORDED)
        assert await refused(put(svc, user, "NEW_ONE", value="new value")) == kept
        assert await refused(put(svc, user, "KEPT", value="changed value")) == kept
        monkeypatch.undo()
        assert await resolve(svc, user, everything=True) == {"KEPT": "changed value", "NEW_ONE": "new value"}

    caplog.set_level(logging.ERROR)
    with_service(bao, keys, test)
    undone = [
        r for r in caplog.records if r.getMessage() == "a change the audit log refused could not be undone"
    ]
    assert [(r.__dict__["action"], r.__dict__["secret"]) for r in undone] == [
        ("secrets.put", "NEW_ONE"),
        ("secrets.put", "KEPT"),
    ]
    assert all(
        "new value" not in str(vars(r)) and "changed value" not in str(vars(r)) for r in caplog.records
    )


def test_every_change_and_every_undo_writes_the_user_a_new_stamp(
    bao: OpenBao, keys: Keys, tmp_path: Path
) -> None:
    """The executor keeps a user's values, and the service their list, while their marker's stamp
    stays the same: a put, a delete that leaves secrets, and an undo after a refused audit record
    each leave a new stamp."""
    markers = UserMarkers(tmp_path / "markers")

    async def test(svc: Service) -> None:
        user = new_user()
        for _ in range(200):
            if (markers.directory / COMPLETE).exists():
                break
            await asyncio.sleep(0.02)
        assert markers.stamp(user.user_id) == UNMARKED
        seen: list[str | None] = []

        def changed() -> bool:
            stamp = markers.stamp(user.user_id)
            fresh = stamp not in seen
            seen.append(stamp)
            return fresh and stamp not in (None, UNMARKED)

        await put(svc, user, "ONE")
        assert changed()
        assert [(s.name, s.description) for s in await listed(svc, user)] == [("ONE", "")]
        # Changed in Vault behind the service's back: the list kept under the stamp still shows
        # the old description (for up to 30 s), until a change through the service restamps.
        bao.root_client().secrets.kv.v2.create_or_update_secret(
            path=f"pythonon/users/{user.user_id}/ONE",
            secret={"value": "x", "description": "behind its back"},
            mount_point="secret",
        )
        assert [(s.name, s.description) for s in await listed(svc, user)] == [("ONE", "")]
        await put(svc, user, "ONE", value="rotated", description="rotated")
        assert changed()
        assert [(s.name, s.description, s.version) for s in await listed(svc, user)] == [
            ("ONE", "rotated", 3)
        ]
        await put(svc, user, "TWO")
        assert changed()
        svc.audit.failing = True
        await refused(put(svc, user, "ONE", value="unrecorded"))
        assert changed()  # a run during the refused put may have kept "unrecorded"
        await refused(delete(svc, user, "TWO"))
        assert changed()
        svc.audit.failing = False
        await delete(svc, user, "TWO")
        assert changed()  # ONE is left
        await delete(svc, user, "ONE")
        assert markers.stamp(user.user_id) == UNMARKED

    with_service(bao, keys, test, user_markers_dir=markers.directory)


# -- Vault unavailable -----------------------------------------------------------------------------


def test_every_call_is_503_with_a_clear_message_while_vault_is_sealed(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        await put(svc, user, "BEFORE")
        bao.seal()
        try:
            for call in (
                put(svc, user, "DURING"),
                put(svc, user, "BEFORE"),
                delete(svc, user, "BEFORE"),
                listed(svc, user),
                resolve(svc, user, "BEFORE"),
                resolve(svc, user, everything=True),
            ):
                assert await refused(call) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)
        finally:
            bao.unseal()
        assert [(s.name, s.version) for s in await listed(svc, user)] == [("BEFORE", 1)]
        assert [a for a, _, _ in svc.audit.of(user)] == ["secrets.put"]

    with_service(bao, keys, test)


def test_every_call_is_503_when_vault_cannot_be_reached(bao: OpenBao, keys: Keys) -> None:
    async def test(svc: Service) -> None:
        user = new_user()
        for call in (put(svc, user, "X"), delete(svc, user, "X"), listed(svc, user), resolve(svc, user, "X")):
            assert await refused(call) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)
        assert svc.audit.records == []

    nowhere = vault_settings(bao, address=f"http://127.0.0.1:{free_port()}", timeout_seconds=1.0)
    with_service(bao, keys, test, vault=nowhere)


def test_describing_a_secret_reads_its_current_version_only(bao: OpenBao) -> None:
    """A list asks Vault once per secret: the creation time is the first version's, or kept in the
    payload from the second on; an entry without it (an earlier layout) is read with its metadata."""
    store = VaultSecretStore(vault_settings(bao))
    states: list[str] = []
    state = store.state
    store.state = lambda uid, name: states.append(name) or state(uid, name)  # type: ignore[method-assign]  # counting
    uid = new_user().user_id
    first = store.write(uid, "KEPT", "v1", "one", cas=0)
    described = store.describe(uid, "KEPT")
    assert described is not None and (described.version, described.created_at) == (1, first.created_at)
    second = store.write(uid, "KEPT", "v2", "two", cas=1, created_at=first.created_at)
    described = store.describe(uid, "KEPT")
    assert described is not None and states == []
    assert (described.version, described.description) == (2, "two")
    assert (described.created_at, described.updated_at) == (first.created_at, second.created_at)

    old = store.write(uid, "OLD", "v1", "", cas=0)
    bao.root_client().secrets.kv.v2.create_or_update_secret(
        path=f"pythonon/users/{uid}/OLD", secret={"value": "v2", "description": ""}, mount_point="secret"
    )
    described = store.describe(uid, "OLD")
    assert described is not None and described.version == 2 and described.created_at == old.created_at
    assert states == ["OLD"]
    store.close()


def test_the_service_renews_its_token(bao: OpenBao) -> None:
    store = VaultSecretStore(vault_settings(bao))
    token = bao.files.service_token.read_text().strip()
    client = hvac.Client(url=bao.address, token=token, timeout=5)
    before = client.auth.token.lookup_self()["data"]["ttl"]
    time.sleep(1.1)
    store.renew_token()
    assert client.auth.token.lookup_self()["data"]["ttl"] >= before
    store.close()


def test_a_refused_token_is_503_not_a_crash(bao: OpenBao, keys: Keys, tmp_path: Path) -> None:
    bad_token = tmp_path / "token"
    bad_token.write_text("s.not-a-real-token\n")

    async def test(svc: Service) -> None:
        assert await refused(listed(svc, new_user())) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)

    with_service(bao, keys, test, vault=vault_settings(bao, token_file=bad_token))


# -- the runner's OpenBao --------------------------------------------------------------------------


def test_openbao_keys_are_private_and_the_service_token_is_limited_to_the_secrets_path(bao: OpenBao) -> None:
    for path in (bao.files.init_file, bao.files.service_token, bao.files.config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    token = bao.files.service_token.read_text().strip()
    assert token != bao.root_token

    client = hvac.Client(url=bao.address, token=token, timeout=5)
    info = client.auth.token.lookup_self()["data"]
    assert sorted(info["policies"]) == ["default", openbao.POLICY_NAME]
    assert info["renewable"] is True and info["period"] > 0
    client.secrets.kv.v2.create_or_update_secret(
        path="pythonon/users/someone/ALLOWED", secret={"value": "x"}, mount_point="secret"
    )
    for forbidden in (
        lambda: client.secrets.kv.v2.create_or_update_secret(
            path="elsewhere/X", secret={"value": "x"}, mount_point="secret"
        ),
        lambda: client.sys.list_mounted_secrets_engines(),
        lambda: client.sys.read_policy(openbao.POLICY_NAME),
        lambda: client.auth.token.create(policies=["default"]),
    ):
        with pytest.raises(hvac.exceptions.Forbidden):
            forbidden()


def test_openbao_restarts_unsealed_with_its_secrets_and_a_fresh_service_token(tmp_path: Path) -> None:
    first = start_openbao(tmp_path)
    try:
        first_token = first.files.service_token.read_text().strip()
        first.root_client().secrets.kv.v2.create_or_update_secret(
            path="pythonon/users/u/KEPT", secret={"value": "persisted"}, mount_point="secret"
        )
        init = first.files.init_file.read_text()
    finally:
        stop_openbao(first)

    second = start_openbao(tmp_path)
    try:
        assert second.files.init_file.read_text() == init  # initialised once
        token = second.files.service_token.read_text().strip()
        assert token != first_token
        client = hvac.Client(url=second.address, token=token, timeout=5)
        read = client.secrets.kv.v2.read_secret_version(
            path="pythonon/users/u/KEPT", mount_point="secret", raise_on_deleted_version=True
        )
        assert read["data"]["data"] == {"value": "persisted"}
        with pytest.raises(hvac.exceptions.Forbidden):  # the previous token was revoked
            hvac.Client(url=second.address, token=first_token, timeout=5).auth.token.lookup_self()
    finally:
        stop_openbao(second)
    assert not any(b"persisted" in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())


def test_openbao_refuses_to_start_without_its_keys(tmp_path: Path) -> None:
    stop_openbao(start_openbao(tmp_path))
    openbao.OpenBaoFiles.at(tmp_path).init_file.rename(tmp_path / "moved-away.json")
    with pytest.raises(openbao.OpenBaoError, match="is initialised but its keys file .* is missing"):
        start_openbao(tmp_path)


def test_the_service_logs_in_with_approle(bao: OpenBao, keys: Keys, tmp_path: Path) -> None:
    """The production path: AppRole credentials whose policy is the secrets path only."""
    root = bao.root_client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        "pythonon-secrets", token_policies=[openbao.POLICY_NAME], token_ttl="10m", token_max_ttl="1h"
    )
    role_id = tmp_path / "role-id"
    secret_id = tmp_path / "secret-id"
    role_id.write_text(root.auth.approle.read_role_id("pythonon-secrets")["data"]["role_id"])
    secret_id.write_text(root.auth.approle.generate_secret_id("pythonon-secrets")["data"]["secret_id"])

    env = Environment(
        {
            "PYTHONON_SECRETS_VAULT_ADDR": bao.address,
            "PYTHONON_SECRETS_VAULT_ROLE_ID_FILE": str(role_id),
            "PYTHONON_SECRETS_VAULT_SECRET_ID_FILE": str(secret_id),
            "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:1",
        }
    )
    settings = SecretsSettings.load(env)

    async def test(svc: Service) -> None:
        user = new_user()
        assert (await put(svc, user, "VIA_APPROLE")).version == 1
        assert await resolve(svc, user, "VIA_APPROLE") == {"VIA_APPROLE": VALUE}

    with_service(bao, keys, test, vault=settings.vault)


# -- settings --------------------------------------------------------------------------------------


def _env(tmp_path: Path, **variables: str) -> Environment:
    token = tmp_path / "token"
    token.write_text("t")
    base = {
        "PYTHONON_SECRETS_VAULT_ADDR": "https://vault.example:8200",
        "PYTHONON_SECRETS_VAULT_TOKEN_FILE": str(token),
        "PYTHONON_AUDIT_ADDRESS": "127.0.0.1:5000",
    }
    return Environment({key: value for key, value in {**base, **variables}.items() if value != "-"})


def test_settings_defaults(tmp_path: Path) -> None:
    settings = SecretsSettings.load(_env(tmp_path))
    assert settings.vault.address == "https://vault.example:8200"
    assert (settings.vault.mount, settings.vault.path_prefix) == ("secret", "pythonon/users")
    assert (settings.max_value_bytes, settings.max_secrets_per_user) == (65536, 100)
    assert settings.vault.approle is None and settings.vault.token_file == tmp_path / "token"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"PYTHONON_SECRETS_VAULT_ADDR": "-"}, "PYTHONON_SECRETS_VAULT_ADDR is required"),
        ({"PYTHONON_SECRETS_VAULT_ADDR": "vault:8200"}, "must be an http:// or https:// URL"),
        ({"PYTHONON_SECRETS_VAULT_TOKEN_FILE": "-"}, "set exactly one way to log in to Vault"),
        ({"PYTHONON_SECRETS_VAULT_TOKEN_FILE": "/nonexistent"}, "not a readable file"),
        ({"PYTHONON_SECRETS_VAULT_ROLE_ID_FILE": "TOKEN"}, "set exactly one way to log in to Vault"),
        ({"PYTHONON_SECRETS_VAULT_SECRET_ID_FILE": "TOKEN"}, "needs PYTHONON_SECRETS_VAULT_ROLE_ID_FILE"),
        ({"PYTHONON_SECRETS_VAULT_MOUNT": "a/b"}, "must be a single path segment"),
        ({"PYTHONON_SECRETS_VAULT_PATH_PREFIX": "a/../b"}, "must not contain '.' or '..'"),
        ({"PYTHONON_SECRETS_VAULT_PATH_PREFIX": "a b"}, "PYTHONON_SECRETS_VAULT_PATH_PREFIX must be a path"),
        ({"PYTHONON_SECRETS_MAX_VALUE_BYTES": "0"}, "must be at least 1"),
        ({"PYTHONON_AUDIT_ADDRESS": "-"}, "PYTHONON_AUDIT_ADDRESS is required"),
    ],
)
def test_settings_refuse_to_start_with_a_clear_message(
    tmp_path: Path, variables: dict[str, str], message: str
) -> None:
    token = str(tmp_path / "token")
    variables = {key: token if value == "TOKEN" else value for key, value in variables.items()}
    with pytest.raises(SettingsError, match=re.escape(message)):
        SecretsSettings.load(_env(tmp_path, **variables))


def test_vault_times_keep_microseconds() -> None:
    assert parse_time("2026-11-28T14:59:47.637668417Z") == datetime(
        2026, 11, 28, 14, 59, 47, 637668, tzinfo=UTC
    )
    assert parse_time("2026-11-28T14:59:47Z") == datetime(2026, 11, 28, 14, 59, 47, tzinfo=UTC)


# -- the system service's view of Vault ------------------------------------------------------------


def test_health_shows_vault_and_is_503_while_it_is_sealed_or_gone(bao: OpenBao, keys: Keys) -> None:
    async def report(vault_address: str) -> tuple[str, str, str | None]:
        server_settings = ephemeral_server_settings("system", keys.public_key_file)
        # A stand-in for the one built service, so only Vault can make the mesh degraded.
        fake = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), fake)
        fake_port = fake.add_insecure_port("127.0.0.1:0")
        await fake.start()
        settings = SystemSettings(services={"auth": f"127.0.0.1:{fake_port}"}, vault_address=vault_address)
        parts = await build_system(server_settings, settings)
        server, _health, port = await start_server(server_settings, parts)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = system_pb2_grpc.SystemServiceStub(channel).Health(
                    system_pb2.HealthRequest(), timeout=10
                )
                metadata = dict(await call.initial_metadata() or ())
                response = await call
        finally:
            await server.stop(None)
            await fake.stop(None)
            for close in parts.on_stop:
                await close()
        return response.status, response.services["vault"], metadata.get(HTTP_STATUS_HEADER)

    assert run(report(bao.address)) == ("ok", "ok", None)
    bao.seal()
    try:
        assert run(report(bao.address)) == ("degraded", "down", "503")
    finally:
        bao.unseal()
    assert run(report(f"http://127.0.0.1:{free_port()}")) == ("degraded", "down", "503")
    assert parse_vault_address("") is None
    with pytest.raises(SettingsError, match="PYTHONON_SYSTEM_VAULT_ADDR must be an http"):
        parse_vault_address("vault:8200")
