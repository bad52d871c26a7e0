"""The zk service's logic: a user's encrypted code, stored as the client encrypted it, and run by
the executor, whose sandbox alone decrypts it. Knows nothing of gRPC.

This service handles ciphertext and, for `execute`, the password on its way to the sandbox; never
the code in clear (`encrypt`, a convenience for testing, is the one exception: it encrypts and
keeps nothing). Every action is recorded in the audit log with names, sizes and digests of the
ciphertext, never a password or any code. A change is made first and recorded second; if the
record cannot be written it is undone and the caller gets 503, as the secrets service does, and
the pair runs to its end even if the request is cancelled."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime

from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.platform.audit import (
    CHANGE_KEPT_UNRECORDED,
    FAILURE,
    SUCCESS,
    AuditClient,
    run_to_completion,
)
from services.platform.db import Database, utc_now
from services.platform.errors import DomainError, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.platform.identity import Identity
from services.zk import recipe
from services.zk.models import StoredCode
from services.zk.names import check_language, check_name
from services.zk.storage import ZkRepository

log = logging.getLogger("pythonon.zk")

ENCRYPT, PUT, DELETE, EXECUTE = "zk.encrypt", "zk.put", "zk.delete", "zk.execute"
MAX_PASSWORD_BYTES = 1024
CONFLICT_MESSAGE = "the payload was being changed by another request at the same time; retry"


@dataclass(frozen=True)
class CodeMetadata:
    """What anyone may know of a stored payload (sha256: of the ciphertext)."""

    name: str
    language: str
    size: int
    sha256: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ZkLimits:
    max_code_bytes: int
    max_payloads_per_user: int


@dataclass(frozen=True)
class EncryptedRun:
    """What the caller gives with `execute`, besides the name."""

    password: str
    stdin: str = ""
    timeout_seconds: float | None = None
    env: dict[str, str] | None = None
    # None: every secret of the user; a list: only those.
    secret_names: list[str] | None = None


def _resource(name: str) -> str:
    return f"zk/code/{name}"


def _reason(error: DomainError) -> str:
    """A refusal as an audit reason: its kind and what it said (never code or a password)."""
    return f"{error.code.name.lower().replace('_', '-')}: {error.message}"


def _metadata(row: StoredCode) -> CodeMetadata:
    return CodeMetadata(
        name=row.name,
        language=row.language,
        size=len(row.ciphertext),
        sha256=row.sha256,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _copy(row: StoredCode) -> StoredCode:
    """A detached copy of a row, to put back if the change that replaced it is undone."""
    return StoredCode(**{column.name: getattr(row, column.name) for column in StoredCode.__table__.columns})


def _check_password(password: str) -> None:
    if not password:
        raise InvalidArgument("a password is required")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise InvalidArgument(f"a password is at most {MAX_PASSWORD_BYTES} bytes (UTF-8)")


class EncryptedCode:
    """Encrypt, put, delete, list and execute the encrypted code of one user at a time."""

    def __init__(
        self,
        db: Database,
        executor: executor_pb2_grpc.ExecutorEncryptedServiceStub,
        audit: AuditClient,
        limits: ZkLimits,
        encrypt_concurrency: int = 2,
    ) -> None:
        self._db = db
        self._executor = executor
        self._audit = audit
        self._limits = limits
        # Each key derivation takes the payload's Argon2 memory: only so many at once.
        self._kdf_slots = asyncio.Semaphore(encrypt_concurrency)
        # One change at a time per user in this process, so the per-user cap holds under concurrency.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def encrypt(self, code: str, password: str) -> recipe.ZkPayload:
        """The recipe applied with the default parameters; nothing is kept, nothing logged but sizes."""
        if not code.strip():
            raise InvalidArgument("code must not be empty")
        if "\x00" in code:
            raise InvalidArgument("code must not contain NUL characters")
        size = len(code.encode("utf-8"))
        if size > self._limits.max_code_bytes:
            raise InvalidArgument(f"code is larger than {self._limits.max_code_bytes // 1024} KiB")
        _check_password(password)
        async with self._kdf_slots:
            payload = await asyncio.to_thread(recipe.encrypt, code, password)
        kdf = payload.kdf
        await self._audit.record(
            ENCRYPT,
            "zk/encrypt",
            SUCCESS,
            {"codeBytes": size, "memoryKib": kdf.memory_kib, "iterations": kdf.iterations},
        )
        return payload

    async def put(self, user: Identity, name: str, payload: recipe.ZkPayload, language: str) -> CodeMetadata:
        """Store the payload under the name (replacing one of that name); its metadata."""
        name = check_name(name)
        language = check_language(language)
        try:
            payload.check()
        except recipe.PayloadError as error:
            raise InvalidArgument(f"payload: {error}") from None
        if len(payload.ciphertext) - recipe.TAG_BYTES > self._limits.max_code_bytes:
            raise InvalidArgument(
                f"the encrypted code is larger than {self._limits.max_code_bytes // 1024} KiB"
            )
        return await run_to_completion(self._put(user, name, payload, language), action=PUT)

    async def delete(self, user: Identity, name: str) -> None:
        """Remove the payload; NotFound when the user has none of that name."""
        name = check_name(name)
        await run_to_completion(self._delete(user, name), action=DELETE)

    async def list(self, user: Identity) -> list[CodeMetadata]:
        """The metadata of every payload of the user, sorted by name."""
        rows = await self._db.run(lambda session: ZkRepository(session).all_of(user.user_id))
        return [_metadata(row) for row in rows]

    async def execute(self, user: Identity, name: str, run: EncryptedRun) -> executor_pb2.ExecuteResponse:
        """Have the executor run the payload; its sandbox decrypts it. A wrong password (or an
        altered payload) is PermissionDenied, and the code never ran."""
        name = check_name(name)
        _check_password(run.password)
        row = await self._db.run(lambda session: ZkRepository(session).find(user.user_id, name))
        if row is None:
            raise NotFound(f"no stored code named {name}")
        request = executor_pb2.ExecuteEncryptedRequest(
            code=executor_pb2.EncryptedCode(
                version=row.version,
                algorithm=row.algorithm,
                salt=row.salt,
                nonce=row.nonce,
                ciphertext=row.ciphertext,
                memory_kib=row.memory_kib,
                iterations=row.iterations,
                parallelism=row.parallelism,
            ),
            language=row.language,
            password=run.password,
            stdin=run.stdin,
            env=run.env or {},
        )
        if run.timeout_seconds is not None:
            request.timeout = run.timeout_seconds
        if run.secret_names is not None:
            request.secrets.SetInParent()  # present, even when empty: no secret at all
            request.secrets.extend(run.secret_names)
        details: dict[str, object] = {
            "name": name,
            "language": row.language,
            "size": len(row.ciphertext),
            "sha256": row.sha256,
        }
        try:
            response = await self._executor.ExecuteEncrypted(request)
        except DomainError as error:
            # Every refusal is recorded with why: a wrong password, or the executor's answer
            # (a payload it cannot decrypt to code, its memory, its limits, its absence).
            reason = "wrong-password" if isinstance(error, PermissionDenied) else _reason(error)
            await run_to_completion(
                self._audit.record(EXECUTE, _resource(name), FAILURE, {**details, "reason": reason}),
                action=EXECUTE,
            )
            raise
        details.update(executionId=response.execution_id, exitCode=response.exit_code)
        await run_to_completion(
            self._audit.record(EXECUTE, _resource(name), SUCCESS, details), action=EXECUTE
        )
        return response

    # -- internals ---------------------------------------------------------------------------------

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[user_id] = lock
        return lock

    async def _put(self, user: Identity, name: str, payload: recipe.ZkPayload, language: str) -> CodeMetadata:
        uid = user.user_id
        now = utc_now()
        digest = hashlib.sha256(payload.ciphertext).hexdigest()

        def write(session: Session) -> tuple[CodeMetadata, StoredCode | None, str]:
            repository = ZkRepository(session)
            row = repository.find(uid, name)
            previous = _copy(row) if row is not None else None
            if row is None:
                if repository.count(uid) >= self._limits.max_payloads_per_user:
                    raise InvalidArgument(
                        f"you already have {self._limits.max_payloads_per_user} stored payloads, the "
                        "most allowed; delete one to add another"
                    )
                row = StoredCode(id=str(uuid.uuid4()), user_id=uid, name=name, created_at=now)
            row.language = language
            row.version = payload.version
            row.algorithm = payload.algorithm
            row.salt, row.nonce, row.ciphertext = payload.salt, payload.nonce, payload.ciphertext
            kdf = payload.kdf
            row.memory_kib, row.iterations, row.parallelism = kdf.memory_kib, kdf.iterations, kdf.parallelism
            row.sha256 = digest
            row.updated_at = now
            if previous is None:
                repository.add(row)
            session.flush()
            return _metadata(row), previous, row.id

        async with self._lock(uid):
            try:
                metadata, previous, row_id = await self._db.run(write)
            except IntegrityError:
                raise Unavailable(CONFLICT_MESSAGE) from None

            async def undo() -> None:
                def restore(session: Session) -> None:
                    repository = ZkRepository(session)
                    repository.remove(row_id)
                    if previous is not None:
                        repository.add(previous)

                await self._db.run(restore)

            details = {
                "name": name,
                "language": language,
                "size": metadata.size,
                "sha256": digest,
                "replaced": previous is not None,
                "kdf": {f.name: getattr(payload.kdf, f.name) for f in fields(payload.kdf)},
            }
            await self._record(PUT, name, details, undo)
        return metadata

    async def _delete(self, user: Identity, name: str) -> None:
        uid = user.user_id

        def remove(session: Session) -> StoredCode:
            repository = ZkRepository(session)
            row = repository.find(uid, name)
            if row is None:
                raise NotFound(f"no stored code named {name}")
            previous = _copy(row)
            repository.remove(row.id)
            return previous

        async with self._lock(uid):
            previous = await self._db.run(remove)

            async def undo() -> None:
                await self._db.run(lambda session: ZkRepository(session).add(_copy(previous)))

            details = {"name": name, "size": len(previous.ciphertext), "sha256": previous.sha256}
            await self._record(DELETE, name, details, undo)

    async def _record(
        self, action: str, name: str, details: dict[str, object], undo: Callable[[], Awaitable[None]]
    ) -> None:
        """Record the change; if that fails, undo it and fail the request (503, not carried out)."""
        try:
            await self._audit.record(action, _resource(name), SUCCESS, details)
        except Unavailable:
            try:
                await undo()
            except (DomainError, IntegrityError):
                log.error("a change the audit log refused could not be undone", extra={"action": action})
                raise Unavailable(CHANGE_KEPT_UNRECORDED) from None
            raise
