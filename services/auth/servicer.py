"""gRPC servicers of the auth service: read the request, call the logic, build the response."""

from __future__ import annotations

import json

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2
from pythonon.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth.accounts import Accounts, Credentials, UserView
from services.auth.edge_check import Decision, EdgeCheck
from services.platform.identity import IdentitySigner, require_identity
from services.platform.rest import set_http_status
from services.platform.service_graph import IDENTITY_HEADER

# Credentials stay at the edge: services get the identity assertion instead.
_CREDENTIAL_HEADERS = ("x-api-key", "authorization")
_GRPC_CODE_FOR_HTTP = {
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
}


def _timestamp(value: object) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


def _user_info(user: UserView) -> auth_pb2.UserInfo:
    return auth_pb2.UserInfo(id=user.id, email=user.email, created_at=_timestamp(user.created_at))


def _auth_response(credentials: Credentials) -> auth_pb2.AuthResponse:
    return auth_pb2.AuthResponse(
        token=credentials.access_token,
        refresh_token=credentials.refresh_token,
        api_key=credentials.api_key,
        expires_in=credentials.expires_in,
        user=_user_info(credentials.user),
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def Register(
        self, request: auth_pb2.AuthRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthResponse:
        credentials = await self._accounts.register(request.email, request.password)
        await set_http_status(context, 201)
        return _auth_response(credentials)

    async def Login(
        self, request: auth_pb2.AuthRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthResponse:
        return _auth_response(await self._accounts.login(request.email, request.password))

    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthResponse:
        return _auth_response(await self._accounts.refresh(request.refresh_token))

    async def Verify(
        self, request: auth_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.VerifyResponse:
        user = await self._accounts.user(require_identity().user_id)
        return auth_pb2.VerifyResponse(
            valid=True, id=user.id, email=user.email, created_at=_timestamp(user.created_at)
        )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class EdgeAuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's ext_authz Check: allowed requests go on with a signed identity assertion."""

    def __init__(self, check: EdgeCheck, signer: IdentitySigner) -> None:
        self._check = check
        self._signer = signer

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        client_ip = request.attributes.source.address.socket_address.address
        decision = await self._check.decide(http.path.split("?", 1)[0], dict(http.headers), client_ip)
        if decision.allowed:
            return self._allow(decision)
        return self._deny(decision)

    def _allow(self, decision: Decision) -> external_auth_pb2.CheckResponse:
        ok = external_auth_pb2.OkHttpResponse(headers_to_remove=list(_CREDENTIAL_HEADERS))
        if decision.identity is not None:
            ok.headers.append(_header(IDENTITY_HEADER, self._signer.sign(decision.identity)))
        else:
            ok.headers_to_remove.append(IDENTITY_HEADER)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)

    def _deny(self, decision: Decision) -> external_auth_pb2.CheckResponse:
        code = _GRPC_CODE_FOR_HTTP.get(decision.http_status, code_pb2.PERMISSION_DENIED)
        headers = [_header("content-type", "application/json")]
        if decision.retry_after:
            headers.append(_header("retry-after", str(decision.retry_after)))
        body = json.dumps({"code": code, "message": decision.message, "details": []})
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code, message=decision.message),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=decision.http_status),
                headers=headers,
                body=body,
            ),
        )
