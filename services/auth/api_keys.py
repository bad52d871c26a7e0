"""API keys: random, looked up by a keyed digest, kept otherwise only encrypted."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.platform.identity import Identity

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


class RecentApiKeys:
    """Which user an API key named, remembered for a few seconds by the key's digest (never the key).

    The edge check runs on every request, and a key names the same user for as long as it exists:
    keys are never rotated, revoked or deleted, and a user's id and email never change. Should any
    of that become possible, the change must call `forget` (or accept that a key keeps working
    for up to `ttl_seconds` after it). Only keys that were found are remembered, so a new key is
    never refused because of an earlier miss. Bounded: the oldest entries go first."""

    def __init__(
        self, ttl_seconds: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Identity]] = OrderedDict()

    def get(self, digest: str) -> Identity | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        expires, identity = entry
        if self._clock() >= expires:
            del self._entries[digest]
            return None
        return identity

    def put(self, digest: str, identity: Identity) -> None:
        if self._ttl <= 0:
            return
        self._entries.pop(digest, None)
        self._entries[digest] = (self._clock() + self._ttl, identity)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)
