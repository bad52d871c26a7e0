"""The generator's logic: a prompt becomes code through Claude, told the facts of the run it will
get, and optionally runs through the executor. Knows nothing of gRPC.

Order: not configured → 503 before anything else; then the request is checked (prompt, language,
timeout, package installation); then the user's secret names; the model; the run; the audit record
(prompt digest and size, model, token usage, whether it ran and the execution id: never the prompt or
the code), written before the answer."""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pythonon.executor.v1 import executor_pb2

from services.generator.answers import NOT_CONFIGURED_MESSAGE, ModelAnswer
from services.generator.executor_client import ExecutorClient
from services.generator.instructions import RunFacts, system_prompt
from services.generator.secret_names import SecretNames
from services.generator.user_packages import UserPackages, package_name
from services.platform.audit import FAILURE, SUCCESS, AuditClient
from services.platform.errors import DomainError, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from services.generator.model import ClaudeCodeWriter

log = logging.getLogger("pythonon.generator")

MAX_PROMPT_BYTES = 32 * 1024
ACTION = "generator.generate"
# The languages whose runs import the user's Python packages (bash runs python3 too).
LANGUAGES_WITH_PACKAGES = frozenset({"python", "bash"})


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    language: str = ""
    execute: bool = False
    timeout_seconds: float | None = None
    install_packages: bool = False


@dataclass(frozen=True)
class Generated:
    answer: ModelAnswer
    language: str
    missing_packages: list[str]  # what the code needs that the user's list lacks (before any install)
    run: executor_pb2.ExecuteResponse | None


class Generations:
    """`writer` None: not configured (no API key)."""

    def __init__(
        self,
        writer: ClaudeCodeWriter | None,
        executor: ExecutorClient,
        secrets: SecretNames,
        audit: AuditClient,
        packages: UserPackages,
    ) -> None:
        self._writer = writer
        self._executor = executor
        self._secrets = secrets
        self._audit = audit
        self._packages = packages

    @property
    def configured(self) -> bool:
        return self._writer is not None

    async def generate(self, request: GenerationRequest) -> Generated:
        if self._writer is None:
            raise Unavailable(NOT_CONFIGURED_MESSAGE)
        writer = self._writer
        prompt_bytes = _check_prompt(request.prompt)
        capabilities = await self._executor.capabilities()
        language = _language(request.language or "python", capabilities)
        timeout = _timeout(request.timeout_seconds, capabilities.limits)
        secret_names = await self._secrets.list()
        user_packages = await self._packages.specs()
        limits = capabilities.limits
        facts = RunFacts(
            language=language,
            runtime_version=next((r.version for r in capabilities.runtimes if r.language == language), ""),
            timeout_seconds=timeout if timeout is not None else limits.timeout_default_seconds,
            memory_bytes=limits.memory_bytes,
            processes=limits.processes,
            output_bytes=limits.output_bytes,
            file_bytes=limits.file_bytes,
            tmp_bytes=limits.tmp_bytes,
            packages=user_packages if language in LANGUAGES_WITH_PACKAGES else (),
            secret_names=secret_names,
        )
        details: dict[str, object] = {
            "promptSha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
            "promptBytes": prompt_bytes,
            "language": language,
            "model": writer.model,
            "execute": request.execute,
        }
        resource = f"generation/{uuid.uuid4().hex}"
        try:
            answer = await writer.write(system_prompt(facts), request.prompt)
        except DomainError as error:
            await self._record_failure(resource, {**details, "reason": error.code.name.lower()})
            raise
        details.update(
            model=answer.model,
            inputTokens=answer.usage.input_tokens,
            outputTokens=answer.usage.output_tokens,
            codeSha256=hashlib.sha256(answer.code.encode()).hexdigest(),
            codeBytes=len(answer.code.encode()),
            packages=answer.packages,
        )
        have = {package_name(spec) for spec in user_packages}
        missing = [spec for spec in answer.packages if package_name(spec) not in have]
        if request.install_packages and missing:
            for spec in missing:
                await self._packages.add(spec)
            details["installed"] = missing
        run = None
        if request.execute:
            try:
                run = await self._executor.execute(answer.code, language, timeout)
            except DomainError as error:
                await self._record_failure(
                    resource, {**details, "ran": False, "reason": error.code.name.lower()}
                )
                raise
        details.update(ran=run is not None, executionId=run.execution_id if run is not None else "")
        await self._audit.record(ACTION, resource, SUCCESS, details)
        return Generated(answer=answer, language=language, missing_packages=missing, run=run)

    async def _record_failure(self, resource: str, details: dict[str, object]) -> None:
        """A generation that failed is recorded too, if the audit log can take it; its own error is
        what the caller gets either way."""
        try:
            await self._audit.record(ACTION, resource, FAILURE, details)
        except Unavailable:
            log.warning("a failed generation could not be recorded", extra={"reason": details.get("reason")})


def _check_prompt(prompt: str) -> int:
    if not prompt.strip():
        raise InvalidArgument("prompt must not be empty")
    size = len(prompt.encode())
    if size > MAX_PROMPT_BYTES:
        raise InvalidArgument(f"prompt is larger than {MAX_PROMPT_BYTES // 1024} KiB ({size} bytes)")
    if "\x00" in prompt:
        raise InvalidArgument("prompt must not contain NUL characters")
    return size


def _language(name: str, capabilities: executor_pb2.Capabilities) -> str:
    """The language a name or alias stands for, among those the executor runs."""
    for runtime in capabilities.runtimes:
        if name == runtime.language or name in runtime.aliases:
            return runtime.language
    if name in capabilities.languages:
        return name
    raise InvalidArgument(f"unknown language {name!r}; use one of {', '.join(capabilities.languages)}")


def _timeout(requested: float | None, limits: executor_pb2.ExecutorLimits) -> float | None:
    if requested is None:
        return None
    if not math.isfinite(requested) or requested <= 0 or requested > limits.timeout_max_seconds:
        raise InvalidArgument(
            f"timeout must be more than 0 and at most {limits.timeout_max_seconds:g} seconds"
        )
    return requested
