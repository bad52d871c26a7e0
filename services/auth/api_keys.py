"""API keys: random, looked up by a keyed digest, kept otherwise only encrypted."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "po_"


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pythonon-auth/" + purpose).derive(
        secret
    )


class ApiKeys:
    """Issues API keys and turns them into digests and ciphertexts with keys derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        self._digest_key = _subkey(secret, b"api-key-digest")
        self._cipher = AESGCM(_subkey(secret, b"api-key-encryption"))

    @staticmethod
    def new() -> str:
        return PREFIX + secrets.token_urlsafe(32)

    def digest(self, api_key: str) -> str:
        return hmac.new(self._digest_key, api_key.encode(), hashlib.sha256).hexdigest()

    def encrypt(self, api_key: str, user_id: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._cipher.encrypt(nonce, api_key.encode(), user_id.encode())

    def decrypt(self, ciphertext: bytes, user_id: str) -> str:
        return self._cipher.decrypt(ciphertext[:12], ciphertext[12:], user_id.encode()).decode()
