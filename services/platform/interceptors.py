"""The request interceptor every service runs: it verifies the caller's identity assertion, sets the
request scope, and maps domain errors to gRPC status codes in one place. A request whose bytes are
not a valid message of its method's type is refused INVALID_ARGUMENT here too (gRPC itself would
answer UNKNOWN with the Python exception's class and log a traceback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.platform.access import AccessPolicy
from services.platform.errors import DomainError, InvalidArgument, ResourceExhausted
from services.platform.identity import (
    IdentityVerifier,
    InvalidIdentity,
    RequestScope,
    current_request,
)
from services.platform.service_graph import CLIENT_IP_HEADER, IDENTITY_HEADER, REQUEST_ID_HEADER

log = logging.getLogger("pythonon.requests")


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary and server-streaming handler of the server; see the module docstring."""

    def __init__(self, verifier: IdentityVerifier, policy: AccessPolicy) -> None:
        self._verifier = verifier
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needs_identity = self._policy.needs_identity(method)
        if handler is None:
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._scope(method, needs_identity, context, streaming=False):
                    return await unary(_decoded(request), context)
                raise AssertionError("unreachable: the scope aborts or re-raises")  # for mypy

            return grpc.unary_unary_rpc_method_handler(
                wrapped,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            # A coroutine writing each response (not an async generator): when the caller goes away,
            # the cancellation reaches the handler's own frame wherever it waits, and the finally
            # below closes the handler's responses at once instead of whenever they are collected.
            async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with self._scope(method, needs_identity, context, streaming=True):
                    responses = streaming(_decoded(request), context)
                    try:
                        async for response in responses:
                            await context.write(response)
                    finally:
                        await responses.aclose()

            return grpc.unary_stream_rpc_method_handler(
                wrapped_stream,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        # Client-streaming calls are not wrapped; one that needs an identity fails closed.
        return _refuse_streaming(handler) if needs_identity else handler

    @contextlib.asynccontextmanager
    async def _scope(
        self, method: str, needs_identity: bool, context: grpc.aio.ServicerContext, streaming: bool
    ) -> AsyncIterator[None]:
        """The request scope of one call: its identity verified (or the call refused), domain
        errors mapped to their gRPC codes, the outcome logged."""
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        identity = None
        assertion = str(metadata.get(IDENTITY_HEADER, ""))
        if needs_identity:
            try:
                identity = self._verifier.verify(assertion)
            except InvalidIdentity as error:
                log.info("identity refused", extra={"method": method, "reason": str(error)})
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid identity")
        scope = RequestScope(
            identity=identity,
            request_id=str(metadata.get(REQUEST_ID_HEADER, "")),
            client_ip=str(metadata.get(CLIENT_IP_HEADER, "")),
            assertion=assertion if identity is not None else "",
        )
        token = current_request.set(scope)
        started = time.perf_counter()
        outcome = "OK"
        try:
            yield
        except DomainError as error:
            outcome = error.code.name
            retry_after = (
                (("retry-after", str(error.retry_after)),) if isinstance(error, ResourceExhausted) else ()
            )
            if retry_after and not streaming:
                await context.send_initial_metadata(retry_after)
                retry_after = ()
            # A streaming call refused before its first message must stay trailers-only (its
            # headers are its status), or Envoy would answer REST clients 200 and an empty body;
            # so Retry-After travels with the status there.
            await context.abort(error.code, error.message, trailing_metadata=retry_after)
        except grpc.aio.AbortError:
            outcome = "ABORTED"
            raise
        except asyncio.CancelledError:
            # The caller hung up or its deadline passed. Work that must finish regardless (a
            # change and its audit record) runs shielded; see audit.run_to_completion.
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome = "INTERNAL"
            log.exception("unhandled error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            log.info(
                "rpc",
                extra={
                    "method": method,
                    "outcome": outcome,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            current_request.reset(token)


class _Undecodable:
    """What a request's bytes became when they were not a valid message of `type_name`."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, answering _Undecodable instead of raising on bytes that are not its message
    (the wrapped handler then refuses the call inside its scope, after the identity check)."""
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.name if type_name is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:  # a corrupt wire format, or bad UTF-8 in a string field
            return _Undecodable(name)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid {request.type_name} message")
    return request


def _refuse_streaming(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming calls are not supported")

    return grpc.unary_unary_rpc_method_handler(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
