"""The generator's view of the executor: what it can run (languages, runtime versions, limits) and
running the generated code through the same Execute call as POST /api/v1/execute."""

from __future__ import annotations

from pythonon.executor.v1 import executor_pb2, executor_pb2_grpc

from services.platform.client import connect

# Besides the run's own timeout: waiting for a sandbox slot, the secrets, the audit record.
_EXECUTE_SLACK_SECONDS = 30.0


class ExecutorClient:
    def __init__(self, address: str | None = None) -> None:
        self._channel = connect("executor", address)
        self._capabilities = executor_pb2_grpc.ExecutorCapabilitiesServiceStub(self._channel)
        self._executor = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        self._known: executor_pb2.Capabilities | None = None

    async def capabilities(self) -> executor_pb2.Capabilities:
        """Asked once and remembered (they hold for the executor's life); Unavailable when the
        executor cannot be reached."""
        if self._known is None or not self._known.languages:
            self._known = await self._capabilities.GetCapabilities(executor_pb2.GetCapabilitiesRequest())
        return self._known

    async def execute(
        self, code: str, language: str, timeout_seconds: float | None
    ) -> executor_pb2.ExecuteResponse:
        """Run the code for the user of the request in hand (whose assertion the channel forwards),
        with all of that user's secrets, as a direct call to /api/v1/execute would."""
        request = executor_pb2.ExecuteRequest(code=code, language=language)
        if timeout_seconds is not None:
            request.timeout = timeout_seconds
        known = self._known
        longest = timeout_seconds or (known.limits.timeout_max_seconds if known else 60.0)
        return await self._executor.Execute(request, timeout=longest + _EXECUTE_SLACK_SECONDS)

    async def close(self) -> None:
        await self._channel.close()
