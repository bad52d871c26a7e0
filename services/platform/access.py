"""Which calls need a verified identity, read from the method options in protos/ (the same options
the edge reads), so the rule is written once."""

from __future__ import annotations

import functools
import importlib

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import extension_dict
from pythonon.api.v1 import access_pb2

from services.platform.service_graph import SECTIONS

# Load every section's descriptors so any service (auth's edge check above all) can judge any path.
for _section in SECTIONS:
    importlib.import_module(f"pythonon.{_section}.v1.{_section}_pb2")

_PUBLIC = access_pb2.public
_LIMIT_BY_CLIENT_IP = access_pb2.limit_by_client_ip


# Asked on every call (interceptor, edge check); the options never change in a running process.
@functools.lru_cache(maxsize=1024)
def _method_option(
    method: str, extension: extension_dict._ExtensionFieldDescriptor[descriptor_pb2.MethodOptions, bool]
) -> bool:
    """Reads a boolean method option for a gRPC path such as /pythonon.auth.v1.AuthService/Login."""
    service_name, _, method_name = method.lstrip("/").rpartition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return False
    found = service.methods_by_name.get(method_name)
    return bool(found and found.GetOptions().Extensions[extension])


class AccessPolicy:
    """Calls under `pythonon.` need an identity unless marked public; others (gRPC health,
    reflection, Envoy's ext_authz Check) are infrastructure that the edge does not route, but for
    the system service's public reflection and health (`public.grpc.…`), which tell anyone only
    what the OpenAPI document does."""

    def needs_identity(self, method: str) -> bool:
        return method.startswith("/pythonon.") and not is_public(method)


def is_public(method: str) -> bool:
    return _method_option(method, _PUBLIC)


def is_limited_by_client_ip(method: str) -> bool:
    return _method_option(method, _LIMIT_BY_CLIENT_IP)
