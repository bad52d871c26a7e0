"""How the system service is put together from its settings."""

from __future__ import annotations

from pythonon.system.v1 import system_pb2, system_pb2_grpc

from services.platform import service_graph
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer
from services.platform.service_graph import SECTIONS
from services.platform.settings import ServerSettings
from services.system import public_surface
from services.system.capabilities import ExecutorCapabilities
from services.system.health import HealthChecker
from services.system.info import deployment_info, package_version
from services.system.servicer import SystemServicer
from services.system.settings import SystemSettings, load_settings
from services.system.unbuilt import UnbuiltSectionHandler


async def build(server_settings: ServerSettings, settings: SystemSettings) -> ServiceParts:
    """The servicer, the handler for unbuilt sections, and the health checker's clean-up."""
    version = package_version()
    built = {section for section in SECTIONS if settings.is_built(section)}
    health = HealthChecker(
        sections=SECTIONS,
        services=settings.services,
        database_urls=settings.database_urls,
        version=version,
        vault_address=settings.vault_address,
        own_section="system",
        api_services={
            name: api_service(name)
            for name in settings.services
            if service_graph.service(name).outside_variables
        },
    )
    executor = ExecutorCapabilities(settings.services.get("executor"))
    servicer = SystemServicer(health, deployment_info(built, version), executor)
    return ServiceParts(
        servicers=[
            Servicer(
                add_to_server=system_pb2_grpc.add_SystemServiceServicer_to_server,
                instance=servicer,
                service_name=system_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
            )
        ],
        generic_handlers=[
            UnbuiltSectionHandler(SECTIONS, settings.is_built),
            *public_surface.handlers(health),
        ],
        on_stop=[health.close, executor.close],
    )


def api_service(section: str) -> str:
    """The full name of a section's public gRPC service (pythonon.<section>.v1.<Section>Service):
    a service that needs outside configuration reports NOT_SERVING there until it has it."""
    return f"pythonon.{section}.v1.{section.capitalize()}Service"


DEFINITION: ServiceDefinition[SystemSettings] = ServiceDefinition(
    name="system", load_settings=load_settings, build=build
)
