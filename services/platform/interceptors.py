"""The request interceptor every service runs: it verifies the caller's identity assertion, sets the
request scope, and maps domain errors to gRPC status codes in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.platform.access import AccessPolicy
from services.platform.errors import DomainError, ResourceExhausted
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
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._scope(method, needs_identity, context, streaming=False):
                    return await unary(request, context)
                raise AssertionError("unreachable: the scope aborts or re-raises")  # for mypy

            return grpc.unary_unary_rpc_method_handler(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            # A coroutine writing each response (not an async generator): when the caller goes away,
            # the cancellation reaches the handler's own frame wherever it waits, and the finally
            # below closes the handler's responses at once instead of whenever they are collected.
            async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                async with self._scope(method, needs_identity, context, streaming=True):
                    responses = streaming(request, context)
                    try:
                        async for response in responses:
                            await context.write(response)
                    finally:
                        await responses.aclose()

            return grpc.unary_stream_rpc_method_handler(
                wrapped_stream,
                request_deserializer=handler.request_deserializer,
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


def _refuse_streaming(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming calls are not supported")

    return grpc.unary_unary_rpc_method_handler(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
