"""The executor's logic: validate a request, gather the run's environment (the user's secrets),
run it in the sandbox, record it in the audit log, answer. Knows nothing of gRPC.

Every run that starts is recorded, whatever its caller does. A run whose caller goes away (hangs
up, or its deadline passes) is stopped (the backend kills its sandbox) and recorded as
`cancelled`. A run that ran is recorded with its execution id as the record id, retried until
RECORD_DEADLINE_SECONDS, as a unit of work a hang-up cannot interrupt; if the audit log still
cannot confirm it, the output is withheld, the answer says the code ran, and the record goes on
being retried in the background. A streamed run (`stream`) is the same run; its output has left as
it was written, so only its result is withheld then."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.executor.encrypted_runs import SealedCode
from services.executor.live_output import LiveOutput
from services.executor.packages_client import NO_PACKAGES, PackagesClient
from services.executor.sandbox import (
    LANGUAGES,
    Limits,
    RunResult,
    RunSpec,
    SandboxBackend,
    SandboxBusy,
    SandboxError,
)
from services.executor.sandbox.languages import canonical_name
from services.executor.secrets_client import SecretsClient
from services.platform.audit import (
    CANCELLED,
    FAILURE,
    SUCCESS,
    AuditClient,
    finish_in_background,
    run_to_completion,
)
from services.platform.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.platform.sandbox_environment import MAX_SECRETS_PER_USER, is_reserved
from services.platform.user_markers import UNMARKED, KeptUnderStamp, UserMarkers

MAX_ENV_VARIABLES = 64
MAX_ENV_VALUE_BYTES = 32 * 1024
# How long the record of a run that ran is retried (same record id) before its output is withheld,
# and how long it is retried after that, in the background, so that the run still reaches the log.
RECORD_DEADLINE_SECONDS = 15.0
RECORD_BACKGROUND_SECONDS = 300.0
# How long a streamed run's output is gathered, once some arrives, before it is sent as one event.
COALESCE_SECONDS = 0.01
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
    # Who asks: the sandbox shares its run slots and turns in line fairly among users.
    user_id: str = ""
    # Encrypted code (then `code` is empty): the sandbox decrypts it, see encrypted_runs.
    sealed: SealedCode | None = None


@dataclass(frozen=True)
class ExecutionResult:
    execution_id: str
    result: RunResult


@dataclass(frozen=True)
class OutputEvent:
    """Text a streamed run wrote to one of its streams ("stdout" or "stderr")."""

    stream: str
    text: str


@dataclass(frozen=True)
class ExecutionPolicy:
    default_limits: Limits
    max_timeout_seconds: float
    max_code_bytes: int
    max_stdin_bytes: int


class Executions:
    """Runs users' code; every run is audited (digest and size of the code, never the code)."""

    def __init__(
        self,
        backend: SandboxBackend,
        secrets: SecretsClient,
        audit: AuditClient,
        policy: ExecutionPolicy,
        packages: PackagesClient | None = None,
        secret_markers: UserMarkers | None = None,
    ) -> None:
        self._backend = backend
        self._packages = packages
        self._secrets = secrets
        self._secret_markers = secret_markers
        # The values of each user's secrets, while their marker's stamp stays the same.
        self._kept_secrets: KeptUnderStamp[dict[str, str]] = KeptUnderStamp(
            lambda values: sum(len(name) + len(value.encode()) for name, value in values.items())
        )
        self._audit = audit
        self._policy = policy

    def after_answer(self) -> None:
        """Called once an answer has been sent: the backend makes up for what the run took (a warm
        sandbox) now, off the run's critical path."""
        self._backend.replenish()

    async def stream(self, request: ExecutionRequest) -> AsyncGenerator[OutputEvent | ExecutionResult, None]:
        """`execute`, telling the output as the program writes it: OutputEvents (consecutive pieces
        of one stream joined), then the ExecutionResult. Raises what `execute` raises, when it does.
        Closing the iterator before its end (the caller went away) cancels the run, as a hang-up
        cancels `execute`, and waits until it has unwound (its sandbox killed)."""
        pending: deque[OutputEvent] = deque()
        arrived = asyncio.Event()

        def tell(stream: str, text: str) -> None:
            pending.append(OutputEvent(stream, text))
            arrived.set()

        run = asyncio.ensure_future(self.execute(request, on_output=tell))
        run.add_done_callback(lambda _: arrived.set())
        try:
            while pending or not run.done():
                if not pending:
                    await arrived.wait()
                    arrived.clear()
                    if not run.done():
                        # A program's writes come in bursts (print writes a line, then its
                        # newline): one event for each burst, not for each write.
                        await asyncio.sleep(COALESCE_SECONDS)
                    continue
                first = pending.popleft()
                texts = [first.text]
                while pending and pending[0].stream == first.stream:
                    texts.append(pending.popleft().text)
                yield OutputEvent(first.stream, "".join(texts))
            yield run.result()
        finally:
            if not run.done():
                run.cancel()
                await asyncio.wait({run})

    async def execute(
        self, request: ExecutionRequest, on_output: Callable[[str, str], None] | None = None
    ) -> ExecutionResult:
        """Run the request's code. `on_output(stream, text)`, when given, hears the output as it is
        written (as much as the backend can tell before the run ends), and the rest once the run is
        recorded: all of it, joined, is the result's stdout and stderr."""
        # An alias (py, js, node, sh...) runs as its language, and is recorded under that name.
        language = canonical_name(request.language or "python") or request.language
        limits = self._validate(request, language)
        # The user's package environment (one stat when the user has none); waits for a build.
        packages = await self._packages.for_run(request.user_id, language) if self._packages else NO_PACKAGES
        # The secrets service judges the names (and says which one is wrong). All of a user's
        # secrets, when its markers say the user has none, are none: no call.
        names = None if request.secret_names is None else list(request.secret_names)
        secrets = await self._secrets_of(request.user_id, names)
        # The request's own variables win over secrets of the same name: the caller chose them.
        env = {**secrets, **request.env, **packages.env}
        execution_id = uuid.uuid4().hex
        spec = RunSpec(
            language=language,
            code=request.code,
            stdin=request.stdin,
            env=env,
            limits=limits,
            owner=request.user_id,
            readonly_paths=packages.readonly_paths,
        )
        details: dict[str, object] = {
            "language": language,
            "codeSha256": hashlib.sha256(request.code.encode()).hexdigest(),
            "codeBytes": len(request.code.encode()),
            "secrets": sorted(secrets),
        }
        if request.sealed is not None:
            spec = request.sealed.spec(spec, self._backend.languages())
            details.update(request.sealed.audit_details())
        resource = f"execution/{execution_id}"
        live = LiveOutput(spec.limits.output_bytes, on_output) if on_output is not None else None
        try:
            result = await self._backend.run(spec, live.hear if live is not None else None)
        except asyncio.CancelledError:
            # The sandbox is killed as the cancellation unwinds the backend's run.
            finish_in_background(
                self._audit.record(
                    "executor.execute",
                    resource,
                    CANCELLED,
                    {**details, "reason": "caller_gone"},
                    record_id=execution_id,
                    deadline_seconds=RECORD_DEADLINE_SECONDS,
                ),
                action="executor.execute",
            )
            raise
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
        refusal = request.sealed.refusal(result) if request.sealed is not None else None
        if refusal is not None:
            # The decryptor refused (e.g. a wrong password): the code never ran.
            reason, error = refusal
            await run_to_completion(
                self._audit.record(
                    "executor.execute",
                    resource,
                    FAILURE,
                    {**details, "reason": reason},
                    record_id=execution_id,
                ),
                action="executor.execute",
            )
            raise error
        details.update(
            exitCode=result.exit_code,
            durationMs=result.duration_ms,
            timedOut=result.timed_out,
            truncated=result.truncated,
        )
        await run_to_completion(self._record_run(execution_id, details), action="executor.execute")
        if live is not None:
            live.finish(result)
        return ExecutionResult(execution_id=execution_id, result=result)

    async def _secrets_of(self, user_id: str, names: list[str] | None) -> dict[str, str]:
        """The values of the named secrets (None: all of the user's). All of them, when the user's
        marker says the user has none, are none: no call; while it holds the stamp they were
        resolved under, they are the values kept then (see KeptUnderStamp)."""
        markers = self._secret_markers
        stamp = markers.stamp(user_id) if markers is not None and names is None else None
        if stamp == UNMARKED:
            return {}
        if stamp is None:
            return await self._secrets.resolve(names)
        kept = self._kept_secrets.get(user_id, stamp)
        if kept is not None:
            return dict(kept)
        # Read before the call: a change acknowledged after it writes a new stamp.
        values = await self._secrets.resolve(None)
        self._kept_secrets.keep(user_id, stamp, values)
        return values

    async def _record_run(self, execution_id: str, details: dict[str, object]) -> None:
        def record(deadline_seconds: float) -> Coroutine[Any, Any, object]:
            return self._audit.record(
                "executor.execute",
                f"execution/{execution_id}",
                SUCCESS,
                details,
                record_id=execution_id,
                deadline_seconds=deadline_seconds,
            )

        try:
            await record(RECORD_DEADLINE_SECONDS)
        except Unavailable:
            finish_in_background(record(RECORD_BACKGROUND_SECONDS), action="executor.execute")
            raise Unavailable(
                f"the code ran, but the audit log could not confirm its record within "
                f"{RECORD_DEADLINE_SECONDS:g} seconds, so its output is withheld (execution "
                f"{execution_id}; its record is retried in the background); retry later"
            ) from None

    def _validate(self, request: ExecutionRequest, language: str) -> Limits:
        policy = self._policy
        if language not in LANGUAGES:
            raise InvalidArgument(f"unknown language {language!r}; use one of {', '.join(LANGUAGES)}")
        available = self._backend.languages()
        if language not in available:
            raise InvalidArgument(
                f"{language} is not available on this server; available: {', '.join(available)}"
            )
        if request.sealed is not None:
            request.sealed.check(policy.default_limits.memory_bytes, policy.max_code_bytes)
        elif not request.code.strip():
            raise InvalidArgument("code must not be empty")
        if len(request.code.encode()) > policy.max_code_bytes:
            raise InvalidArgument(f"code is larger than {policy.max_code_bytes // 1024} KiB")
        if "\x00" in request.code:
            raise InvalidArgument("code must not contain NUL characters")
        if len(request.stdin.encode()) > policy.max_stdin_bytes:
            raise InvalidArgument(f"stdin is larger than {policy.max_stdin_bytes // 1024} KiB")
        if request.secret_names is not None and len(request.secret_names) > MAX_SECRETS_PER_USER:
            raise InvalidArgument(f"secrets: at most {MAX_SECRETS_PER_USER} names")
        if len(request.env) > MAX_ENV_VARIABLES:
            raise InvalidArgument(f"env: at most {MAX_ENV_VARIABLES} variables")
        for name, value in request.env.items():
            if not _ENV_NAME.fullmatch(name):
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
