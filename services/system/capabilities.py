"""What the executor can run, asked of the executor itself (languages and enforced limits depend on
the host it runs on), remembered once known."""

from __future__ import annotations

from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.platform.client import connect
from services.platform.errors import DomainError


class ExecutorCapabilities:
    def __init__(self, address: str | None, timeout_seconds: float = 2.0) -> None:
        self._channel = connect("executor", address, timeout_seconds=timeout_seconds) if address else None
        self._known: executor_pb2.Capabilities | None = None

    async def get(self) -> executor_pb2.Capabilities:
        """The executor's capabilities; empty when it is not built or cannot be reached right now."""
        if self._known is not None or self._channel is None:
            return self._known or executor_pb2.Capabilities()
        stub = executor_pb2_grpc.ExecutorCapabilitiesServiceStub(self._channel)
        try:
            self._known = await stub.GetCapabilities(executor_pb2.GetCapabilitiesRequest())
        except DomainError:
            return executor_pb2.Capabilities()
        return self._known

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
