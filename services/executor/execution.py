"""The executor's logic: validate a request, gather the run's environment (the user's secrets),
run it in the sandbox, record it in the audit log, answer. Knows nothing of gRPC."""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.executor.sandbox import (
    LANGUAGES,
    Limits,
    RunResult,
    RunSpec,
    SandboxBackend,
    SandboxBusy,
    SandboxError,
)
from services.executor.secrets_client import SecretsClient
from services.platform.audit import FAILURE, SUCCESS, AuditClient
from services.platform.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.platform.sandbox_environment import is_reserved

MAX_ENV_VARIABLES = 64
MAX_ENV_VALUE_BYTES = 32 * 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ExecutionRequest:
    code: str
    language: str = ""
    stdin: str = ""
    timeout_seconds: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # None: every secret of the user; a list: only those.
    secret_names: Sequence[str] | None = None


@dataclass(frozen=True)
class ExecutionResult:
    execution_id: str
    result: RunResult


@dataclass(frozen=True)
class ExecutionPolicy:
    default_limits: Limits
    max_timeout_seconds: float
    max_code_bytes: int
    max_stdin_bytes: int


class Executions:
    """Runs users' code; every run is audited (digest and size of the code, never the code)."""

    def __init__(
        self, backend: SandboxBackend, secrets: SecretsClient, audit: AuditClient, policy: ExecutionPolicy
    ) -> None:
        self._backend = backend
        self._secrets = secrets
        self._audit = audit
        self._policy = policy

    def after_answer(self) -> None:
        """Called once an answer has been sent: the backend makes up for what the run took (a warm
        sandbox) now, off the run's critical path."""
        self._backend.replenish()

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        language = request.language or "python"
        limits = self._validate(request, language)
        # The secrets service judges the names (and says which one is wrong).
        names = None if request.secret_names is None else list(request.secret_names)
        secrets = await self._secrets.resolve(names)
        # The request's own variables win over secrets of the same name: the caller chose them.
        env = {**secrets, **request.env}
        execution_id = uuid.uuid4().hex
        spec = RunSpec(language=language, code=request.code, stdin=request.stdin, env=env, limits=limits)
        details: dict[str, object] = {
            "language": language,
            "codeSha256": hashlib.sha256(request.code.encode()).hexdigest(),
            "codeBytes": len(request.code.encode()),
            "secrets": sorted(secrets),
        }
        resource = f"execution/{execution_id}"
        try:
            result = await self._backend.run(spec)
        except SandboxBusy as busy:
            raise ResourceExhausted(
                "the executor is busy; retry shortly", retry_after=math.ceil(busy.retry_after)
            ) from None
        except ValueError as refused:
            # The backend's own checks of the spec (e.g. NUL in an env value): the caller's mistake.
            raise InvalidArgument(str(refused)) from None
        except SandboxError:
            await self._audit.record(
                "executor.execute", resource, FAILURE, {**details, "reason": "sandbox_error"}
            )
            raise Unavailable("the sandbox failed to run the code; retry later") from None
        details.update(
            exitCode=result.exit_code,
            durationMs=result.duration_ms,
            timedOut=result.timed_out,
            truncated=result.truncated,
        )
        await self._audit.record("executor.execute", resource, SUCCESS, details)
        return ExecutionResult(execution_id=execution_id, result=result)

    def _validate(self, request: ExecutionRequest, language: str) -> Limits:
        policy = self._policy
        if language not in LANGUAGES:
            raise InvalidArgument(f"unknown language {language!r}; use one of {', '.join(LANGUAGES)}")
        available = self._backend.languages()
        if language not in available:
            raise InvalidArgument(
                f"{language} is not available on this server; available: {', '.join(available)}"
            )
        if not request.code.strip():
            raise InvalidArgument("code must not be empty")
        if len(request.code.encode()) > policy.max_code_bytes:
            raise InvalidArgument(f"code is larger than {policy.max_code_bytes // 1024} KiB")
        if "\x00" in request.code:
            raise InvalidArgument("code must not contain NUL characters")
        if len(request.stdin.encode()) > policy.max_stdin_bytes:
            raise InvalidArgument(f"stdin is larger than {policy.max_stdin_bytes // 1024} KiB")
        if len(request.env) > MAX_ENV_VARIABLES:
            raise InvalidArgument(f"at most {MAX_ENV_VARIABLES} environment variables")
        for name, value in request.env.items():
            if not _ENV_NAME.match(name):
                raise InvalidArgument(f"env: {name!r} is not an environment-variable name")
            if is_reserved(name):
                raise InvalidArgument(f"env: {name} is set by the sandbox and cannot be overridden")
            if len(value.encode()) > MAX_ENV_VALUE_BYTES or "\x00" in value:
                raise InvalidArgument(f"env: the value of {name} is too large or contains NUL")
        timeout = request.timeout_seconds
        if timeout is None:
            return policy.default_limits
        if not math.isfinite(timeout) or timeout <= 0 or timeout > policy.max_timeout_seconds:
            raise InvalidArgument(
                f"timeout must be more than 0 and at most {policy.max_timeout_seconds:g} seconds"
            )
        return replace(policy.default_limits, timeout_seconds=timeout)
