"""The asynchronous client: the same calls as Client, awaited."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx

from pyth_on import _calls
from pyth_on._calls import Call, RetryPolicy
from pyth_on.encryption import Kdf, ZkPayload, encrypt_local
from pyth_on.errors import TransportError
from pyth_on.models import (
    AuditEntry,
    AuditPage,
    ChainVerification,
    EncryptedCode,
    ExecutionResult,
    Generation,
    Package,
    SecretMetadata,
    Session,
    StreamEvent,
    User,
)

T = TypeVar("T")


class AsyncClient:
    """A client of one Pyth-On server.

    `base_url` defaults to PYTHONON_URL (else http://127.0.0.1:8080); the credential is an API key
    (`po_...`, default PYTHONON_API_KEY) or a Bearer access `token`. Failed calls raise ApiError;
    429 and 503 are retried as `retry` says. Use it as a context manager, or call close().
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float | httpx.Timeout = _calls.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = _calls.base_url(base_url)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"user-agent": _calls.USER_AGENT, **_calls.credentials(api_key, token)},
            timeout=timeout,
            transport=transport,
        )
        self.secrets = Secrets(self)
        self.packages = Packages(self)
        self.zk = Zk(self)
        self.audit = Audit(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # Running code.

    async def execute(
        self,
        code: str,
        *,
        language: str | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[str] | None = None,
    ) -> ExecutionResult:
        """Run `code` (language python by default, javascript or bash) and wait for its result.
        `secrets` names the user's secrets to put in its environment: None means all, [] none."""
        return await self._send(_calls.execute(_calls.run_body(code, language, stdin, timeout, env, secrets)))

    async def stream(
        self,
        code: str,
        *,
        language: str | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[str] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Run `code` and yield its output as it is produced (OutputEvent), then its ResultEvent.
        Leaving the loop early closes the connection, which ends the run."""
        body = _calls.run_body(code, language, stdin, timeout, env, secrets)
        attempt = 0
        while True:
            try:
                async with self._http.stream("POST", _calls.STREAM_PATH, json=body) as response:
                    if response.is_success:
                        decoder = _calls.StreamDecoder(response.headers.get("x-request-id"))
                        async for line in response.aiter_lines():
                            event = decoder.event(line)
                            if event is not None:
                                yield event
                        decoder.check_finished()
                        return
                    await response.aread()
            except httpx.HTTPError as error:
                raise TransportError(f"{self.base_url}: {error}") from error
            delay = self.retry.delay(response, attempt)
            if delay is None:
                raise _calls.api_error(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def generate(
        self,
        prompt: str,
        *,
        language: str | None = None,
        execute: bool = False,
        timeout: float | None = None,
        install_packages: bool = False,
    ) -> Generation:
        """Have the model write code for `prompt`; with `execute`, run it too."""
        return await self._send(_calls.generate(prompt, language, execute, timeout, install_packages))

    # Accounts.

    async def register(self, email: str, password: str) -> Session:
        return await self._send(_calls.register(email, password))

    async def login(self, email: str, password: str) -> Session:
        """Log in; the Session holds the user's API key and an access token."""
        return await self._send(_calls.login(email, password))

    async def whoami(self) -> User:
        """The user the credential belongs to (401 when it is not valid)."""
        return await self._send(_calls.whoami())

    async def info(self) -> dict[str, Any]:
        """`GET /api/info`: languages with their runtime versions, limits, features."""
        return await self._send(_calls.info())

    # Transport.

    async def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.body, params=call.params
                )
            except httpx.HTTPError as error:
                raise TransportError(f"{self.base_url}: {error}") from error
            if response.is_success:
                return call.read(_calls.decode_json(response))
            delay = self.retry.delay(response, attempt)
            if delay is None:
                raise _calls.api_error(response)
            await asyncio.sleep(delay)
            attempt += 1


class Secrets:
    """The user's secrets: write-only values, readable names and metadata."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def put(self, name: str, value: str, *, description: str | None = None) -> SecretMetadata:
        """Create or replace a secret (its name an environment variable name)."""
        return await self._client._send(_calls.put_secret(name, value, description))

    async def delete(self, name: str) -> None:
        await self._client._send(_calls.delete_secret(name))

    async def list(self) -> builtins.list[SecretMetadata]:
        return await self._client._send(_calls.list_secrets())


class Packages:
    """The user's Python packages, built into an environment every run of theirs imports."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def set(self, specs: Sequence[str]) -> builtins.list[Package]:
        """Replace the whole list (PEP 508 names with version specifiers)."""
        return await self._client._send(_calls.set_packages(specs))

    async def add(self, spec: str) -> builtins.list[Package]:
        return await self._client._send(_calls.add_package(spec))

    async def remove(self, name: str) -> builtins.list[Package]:
        return await self._client._send(_calls.remove_package(name))

    async def list(self) -> builtins.list[Package]:
        return await self._client._send(_calls.list_packages())

    async def wait(
        self,
        *,
        timeout: float = 600.0,
        poll: float = 0.5,
        on_progress: Callable[[builtins.list[Package]], None] | None = None,
    ) -> builtins.list[Package]:
        """Poll the list until every package is ready or failed; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            packages = await self.list()
            if on_progress is not None:
                on_progress(packages)
            if all(package.settled for package in packages):
                return packages
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the packages were still building after {timeout:g} s")
            await asyncio.sleep(poll)


class Zk:
    """Zero-knowledge code: encrypted here, stored and run by the server, readable only in the run."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @staticmethod
    def encrypt_local(code: str, password: str, kdf: Kdf | None = None) -> ZkPayload:
        """Encrypt on this machine (no call to the server)."""
        return encrypt_local(code, password, kdf)

    async def put(
        self, name: str, payload: ZkPayload | Mapping[str, Any], *, language: str | None = None
    ) -> EncryptedCode:
        return await self._client._send(_calls.put_code(name, payload, language))

    async def delete(self, name: str) -> None:
        await self._client._send(_calls.delete_code(name))

    async def run(
        self,
        name: str,
        password: str,
        *,
        stdin: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[str] | None = None,
    ) -> ExecutionResult:
        """Decrypt the stored code inside a sandbox and run it there (403 for a wrong password)."""
        body = _calls.run_body(None, None, stdin, timeout, env, secrets)
        return await self._client._send(_calls.run_code(name, password, body))

    async def list(self) -> builtins.list[EncryptedCode]:
        return await self._client._send(_calls.list_code())


class Audit:
    """The user's audit log (newest first) and the check of its hash chain."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def page(
        self,
        *,
        cursor: str | None = None,
        page_size: int | None = None,
        action: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
    ) -> AuditPage:
        return await self._client._send(_calls.audit_page(cursor, page_size, action, since, until))

    async def list(
        self,
        *,
        page_size: int | None = None,
        action: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
    ) -> AsyncIterator[AuditEntry]:
        """Every entry matching the filters, newest first, fetching page after page as it goes."""
        cursor: str | None = None
        while True:
            page = await self.page(
                cursor=cursor, page_size=page_size, action=action, since=since, until=until
            )
            for entry in page.entries:
                yield entry
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def verify(self) -> ChainVerification:
        return await self._client._send(_calls.verify_chain())
