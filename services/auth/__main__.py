"""The auth service process: `python -m services.auth`."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth import settings as auth_settings
from services.auth.accounts import Accounts
from services.auth.api_keys import ApiKeys
from services.auth.edge_check import EdgeCheck
from services.auth.events import AuthEvents
from services.auth.rate_limits import TokenBuckets
from services.auth.servicer import AuthServicer, EdgeAuthorizationServicer
from services.auth.settings import AuthSettings
from services.auth.tokens import AccessTokens
from services.platform.audit import AuditClient
from services.platform.bootstrap import ServiceDefinition, ServiceParts, Servicer, run
from services.platform.db import Database, Schema
from services.platform.identity import IdentitySigner
from services.platform.settings import ServerSettings


async def build(server: ServerSettings, settings: AuthSettings) -> ServiceParts:
    """Wire the auth service's parts from its settings (tests call this too)."""
    db = Database(settings.database_url)
    db.require_at_head(Schema("auth"))  # `pyth-on migrate` brings it there, once
    signer = IdentitySigner(settings.identity_private_key)
    audit = AuditClient(settings.audit_address)
    accounts = Accounts(
        db,
        ApiKeys(settings.secret_key),
        AccessTokens(settings.access_token_private_key, settings.access_token_ttl_seconds),
        settings.refresh_token_ttl_seconds,
        AuthEvents(audit, signer),
        api_key_cache_seconds=settings.api_key_cache_seconds,
    )
    check = EdgeCheck(
        accounts, TokenBuckets(settings.user_rate_limit), TokenBuckets(settings.client_ip_rate_limit)
    )

    async def close() -> None:
        await audit.close()
        db.dispose()

    return ServiceParts(
        servicers=[
            Servicer(
                auth_pb2_grpc.add_AuthServiceServicer_to_server,
                AuthServicer(accounts),
                auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
            ),
            Servicer(
                external_auth_pb2_grpc.add_AuthorizationServicer_to_server,
                EdgeAuthorizationServicer(check, signer),
                external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            ),
        ],
        on_stop=[close],
    )


DEFINITION = ServiceDefinition(name="auth", load_settings=auth_settings.load, build=build)

if __name__ == "__main__":
    run(DEFINITION)
