"""The generator process: `python -m services.generator`."""

from __future__ import annotations

import logging

from pythonon.generator.v1 import generator_pb2, generator_pb2_grpc

from services.generator import settings as generator_settings
from services.generator.executor_client import ExecutorClient
from services.generator.generation import Generations
from services.generator.secret_names import SecretNames
from services.generator.servicer import GeneratorServicer
from services.generator.settings import GeneratorSettings
from services.generator.user_packages import UserPackages
from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.settings import ServerSettings

log = logging.getLogger("pythonon.generator")


async def build(server: ServerSettings, settings: GeneratorSettings) -> ServiceParts:
    """Wire the generator's parts. Without an API key it still serves: Generate answers 503 and its
    gRPC health reports the GeneratorService NOT_SERVING (/health: "not_configured")."""
    writer = None
    if settings.api_key is not None:
        from services.generator.model import ClaudeCodeWriter  # the SDK only where it is used

        writer = ClaudeCodeWriter(
            settings.api_key,
            settings.model,
            base_url=settings.base_url,
            max_tokens=settings.max_tokens,
            timeout_seconds=settings.timeout_seconds,
            max_retries=settings.max_retries,
        )
    else:
        log.warning("not configured: ANTHROPIC_API_KEY is not set, so generate answers 503")
    executor = ExecutorClient(settings.executor_address)
    secrets = SecretNames(settings.secrets_address)
    audit = AuditClient(settings.audit_address)
    packages = UserPackages(settings.packages_address)
    generations = Generations(writer, executor, secrets, audit, packages)

    async def close() -> None:
        if writer is not None:
            await writer.close()
        await executor.close()
        await secrets.close()
        await audit.close()
        if packages is not None:
            await packages.close()

    name = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name
    return ServiceParts(
        servicers=[
            Servicer(
                generator_pb2_grpc.add_GeneratorServiceServicer_to_server,
                GeneratorServicer(generations),
                name,
            )
        ],
        on_stop=[close],
        not_serving=() if generations.configured else (name,),
    )


DEFINITION = ServiceDefinition(name="generator", load_settings=generator_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
