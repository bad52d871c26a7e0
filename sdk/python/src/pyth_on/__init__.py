"""Pyth-On's Python SDK: run code, stream its output, and manage secrets, packages, zero-knowledge
code and the audit log of a Pyth-On server.

    import pyth_on

    with pyth_on.Client("http://127.0.0.1:8080", api_key="po_...") as client:
        result = client.execute("print(6 * 7)")
        print(result.output, result.exit_code)
"""

from pyth_on._calls import RetryPolicy
from pyth_on.async_client import AsyncClient
from pyth_on.client import Client
from pyth_on.encryption import Kdf, WrongPassword, ZkPayload, decrypt_local, encrypt_local
from pyth_on.errors import ApiError, PythOnError, TransportError
from pyth_on.models import (
    AuditEntry,
    AuditPage,
    ChainVerification,
    EncryptedCode,
    ExecutionResult,
    Generation,
    OutputEvent,
    Package,
    ResultEvent,
    SecretMetadata,
    Session,
    StreamEvent,
    User,
)

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuditEntry",
    "AuditPage",
    "ChainVerification",
    "Client",
    "EncryptedCode",
    "ExecutionResult",
    "Generation",
    "Kdf",
    "OutputEvent",
    "Package",
    "PythOnError",
    "ResultEvent",
    "RetryPolicy",
    "SecretMetadata",
    "Session",
    "StreamEvent",
    "TransportError",
    "User",
    "WrongPassword",
    "ZkPayload",
    "decrypt_local",
    "encrypt_local",
]
