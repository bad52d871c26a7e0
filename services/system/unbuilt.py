"""The answer for API sections that this version does not have yet.

The edge routes every section without an upstream of its own to the system service, so a client
calling, say, the executor before it exists gets a clear UNIMPLEMENTED instead of a routing error."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import grpc

# /pythonon.<section>.v1.<Service>/<Method>
_METHOD = re.compile(r"^/pythonon\.([a-z0-9_]+)\.v\d+\.[A-Za-z0-9_]+/[A-Za-z0-9_]+$")


def unavailable_message(section: str) -> str:
    return f"the {section} API is not available in this version yet"


class UnbuiltSectionHandler(grpc.GenericRpcHandler):
    """Answers any method of a known but unbuilt section with UNIMPLEMENTED.

    It is unary with bytes passthrough on purpose: the platform's request interceptor only wraps
    unary handlers, so identity is still verified before this answers (an anonymous caller learns
    nothing more than "unauthenticated"), and no message type of the section needs to be known."""

    def __init__(self, sections: Iterable[str], is_built: Callable[[str], bool]) -> None:
        self._unbuilt = frozenset(section for section in sections if not is_built(section))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        match = _METHOD.fullmatch(handler_call_details.method or "")
        if match is None or match.group(1) not in self._unbuilt:
            return None
        message = unavailable_message(match.group(1))

        async def unimplemented(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return grpc.unary_unary_rpc_method_handler(unimplemented)
