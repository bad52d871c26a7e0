"""gRPC servicer of the generator: read the request, call the logic, build the response."""

from __future__ import annotations

import grpc
from pythonon.generator.v1 import generator_pb2, generator_pb2_grpc

from services.generator.generation import GenerationRequest, Generations


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, generations: Generations) -> None:
        self._generations = generations

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generator_pb2.GenerateResponse:
        generated = await self._generations.generate(
            GenerationRequest(
                prompt=request.prompt,
                language=request.language,
                execute=request.execute,
                timeout_seconds=request.timeout if request.HasField("timeout") else None,
                install_packages=request.install_packages,
            )
        )
        answer, run = generated.answer, generated.run
        response = generator_pb2.GenerateResponse(
            code=answer.code,
            language=generated.language,
            packages=generated.missing_packages,
            model=answer.model,
            explanation=answer.explanation,
        )
        if run is not None:
            response.output, response.error, response.exit_code = run.output, run.error, run.exit_code
        return response
