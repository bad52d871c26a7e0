"""The secrets service process: `python -m services.secrets`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pythonon.secrets.v1 import secrets_pb2, secrets_pb2_grpc

from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.errors import Unavailable
from services.platform.settings import ServerSettings
from services.platform.user_markers import UserMarkers
from services.secrets import settings as secrets_settings
from services.secrets.rules import SecretLimits
from services.secrets.servicer import SecretsResolverServicer, SecretsServicer
from services.secrets.settings import SecretsSettings
from services.secrets.user_secrets import UserSecrets
from services.secrets.vault import VaultSecretStore

log = logging.getLogger("pythonon.secrets")


async def _keep_token_alive(store: VaultSecretStore, interval_seconds: int) -> None:
    """Renew the service's Vault token now and then, so a periodic or TTL token never lapses in use."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await asyncio.to_thread(store.renew_token)
        except Unavailable:
            log.warning("could not renew the vault token; will retry")


async def build(server: ServerSettings, settings: SecretsSettings) -> ServiceParts:
    """Wire the secrets service's parts from its settings (tests call this too)."""
    store = VaultSecretStore(settings.vault)
    audit = AuditClient(settings.audit_address)
    markers = None
    if settings.user_markers_dir is not None:
        # Incomplete until reconciled with Vault, before anything is served.
        markers = UserMarkers(settings.user_markers_dir).create()
        markers.incomplete()
    secrets = UserSecrets(
        store,
        audit,
        SecretLimits(
            max_value_bytes=settings.max_value_bytes, max_secrets_per_user=settings.max_secrets_per_user
        ),
        markers,
    )
    loop = asyncio.get_running_loop()
    background = [
        loop.create_task(_keep_token_alive(store, settings.vault.renew_interval_seconds)),
        loop.create_task(secrets.keep_markers()),
    ]

    async def close() -> None:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await audit.close()
        store.close()

    return ServiceParts(
        servicers=[
            Servicer(
                secrets_pb2_grpc.add_SecretsServiceServicer_to_server,
                SecretsServicer(secrets),
                secrets_pb2.DESCRIPTOR.services_by_name["SecretsService"].full_name,
            ),
            Servicer(
                secrets_pb2_grpc.add_SecretsResolverServiceServicer_to_server,
                SecretsResolverServicer(secrets),
                secrets_pb2.DESCRIPTOR.services_by_name["SecretsResolverService"].full_name,
            ),
        ],
        on_stop=[close],
    )


DEFINITION = ServiceDefinition(name="secrets", load_settings=secrets_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
