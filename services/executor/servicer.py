"""gRPC servicers of the executor: read the request, call the logic, build the response."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.rpc import status_pb2
from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.executor.encrypted_runs import sealed_code_from
from services.executor.execution import (
    ExecutionPolicy,
    ExecutionRequest,
    ExecutionResult,
    Executions,
    OutputEvent,
)
from services.executor.runtime_versions import RuntimeVersions
from services.executor.sandbox import LANGUAGES, SandboxBackend
from services.platform.errors import DomainError, Internal, InvalidArgument
from services.platform.identity import require_identity

log = logging.getLogger("pythonon.executor")


def secret_names(
    request: executor_pb2.ExecuteRequest | executor_pb2.ExecuteEncryptedRequest,
) -> list[str] | None:
    """`secrets` absent means all of the user's secrets; a list names some (possibly none)."""
    if not request.HasField("secrets"):
        return None
    names = []
    for value in request.secrets.values:
        if value.WhichOneof("kind") != "string_value":
            raise InvalidArgument("secrets must be a list of secret names")
        names.append(value.string_value)
    return names


def to_execution_request(request: executor_pb2.ExecuteRequest, user_id: str) -> ExecutionRequest:
    return ExecutionRequest(
        user_id=user_id,
        code=request.code,
        language=request.language,
        stdin=request.stdin,
        timeout_seconds=request.timeout if request.HasField("timeout") else None,
        env=dict(request.env),
        secret_names=secret_names(request),
    )


def to_response(done: ExecutionResult) -> executor_pb2.ExecuteResponse:
    result = done.result
    return executor_pb2.ExecuteResponse(
        output=result.stdout,
        error=result.stderr,
        exit_code=result.exit_code,
        duration_ms=result.duration_ms,
        timed_out=result.timed_out,
        truncated=result.truncated,
        execution_id=done.execution_id,
    )


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executions: Executions) -> None:
        self._executions = executions

    async def Execute(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        context.add_done_callback(lambda _context: self._executions.after_answer())
        # A run waiting in line for a slot leaves it when its caller goes away: gRPC cancels this
        # task, and the cancellation unwinds the backend's wait (see admission.Admission.slot).
        done = await self._executions.execute(to_execution_request(request, require_identity().user_id))
        return to_response(done)

    async def ExecuteStream(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.ExecuteEvent]:
        context.add_done_callback(lambda _context: self._executions.after_answer())
        events = self._executions.stream(to_execution_request(request, require_identity().user_id))
        told = False
        try:
            async for event in events:
                if isinstance(event, OutputEvent):
                    told = True
                    yield (
                        executor_pb2.ExecuteEvent(stdout=event.text)
                        if event.stream == "stdout"
                        else executor_pb2.ExecuteEvent(stderr=event.text)
                    )
                else:
                    yield executor_pb2.ExecuteEvent(result=to_response(event))
        except Exception as error:
            if not told:
                raise  # nothing sent yet: the call's status, as Execute's (HTTP 400, 429, 503...)
            # An HTTP/1.1 client sees no trailers: a failure after the first event is the last event.
            if not isinstance(error, DomainError):
                log.exception("unhandled error in a streamed run")
                error = Internal("internal error")
            yield executor_pb2.ExecuteEvent(
                error=status_pb2.Status(code=error.code.value[0], message=error.message)
            )
        finally:
            await events.aclose()


class CapabilitiesServicer(executor_pb2_grpc.ExecutorCapabilitiesServiceServicer):
    def __init__(self, backend: SandboxBackend, policy: ExecutionPolicy) -> None:
        self._backend = backend
        self._policy = policy
        self._versions = RuntimeVersions(backend)

    async def GetCapabilities(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.Capabilities:
        versions = await self._versions.get()
        limits = self._policy.default_limits
        return executor_pb2.Capabilities(
            sandbox=self._backend.name,
            languages=self._backend.languages(),
            enforced_limits=self._backend.enforced_limits(),
            runtimes=[
                executor_pb2.Runtime(language=name, version=version, aliases=LANGUAGES[name].aliases)
                for name, version in versions.items()
            ],
            limits=executor_pb2.ExecutorLimits(
                timeout_default_seconds=limits.timeout_seconds,
                timeout_max_seconds=self._policy.max_timeout_seconds,
                memory_bytes=limits.memory_bytes,
                processes=limits.processes,
                output_bytes=limits.output_bytes,
                file_bytes=limits.file_bytes,
                tmp_bytes=limits.tmp_bytes,
                code_bytes=self._policy.max_code_bytes,
            ),
        )


class EncryptedExecutorServicer(executor_pb2_grpc.ExecutorEncryptedServiceServicer):
    """Internal, for the zk service: the code arrives encrypted and is decrypted in the sandbox."""

    def __init__(self, executions: Executions) -> None:
        self._executions = executions

    async def ExecuteEncrypted(  # noqa: N802 (gRPC method name)
        self, request: executor_pb2.ExecuteEncryptedRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ExecuteResponse:
        context.add_done_callback(lambda _context: self._executions.after_answer())
        code = request.code
        sealed = sealed_code_from(
            version=code.version,
            algorithm=code.algorithm,
            salt=code.salt,
            nonce=code.nonce,
            ciphertext=code.ciphertext,
            memory_kib=code.memory_kib,
            iterations=code.iterations,
            parallelism=code.parallelism,
            password=request.password,
        )
        done = await self._executions.execute(
            ExecutionRequest(
                user_id=require_identity().user_id,
                code="",
                sealed=sealed,
                language=request.language,
                stdin=request.stdin,
                timeout_seconds=request.timeout if request.HasField("timeout") else None,
                env=dict(request.env),
                secret_names=secret_names(request),
            )
        )
        return to_response(done)
