"""Pyth-On's zero-knowledge code recipe, for clients: encrypt code under a password into a ZKPayload
that the server stores but cannot read, and decrypt one back.

The recipe (README "Zero-knowledge code" says the same, for implementers in other languages):

    key        = Argon2id(password as UTF-8, salt (16 random bytes), iterations, memory in KiB,
                          parallelism, output of 32 bytes; Argon2 version 0x13)
    ciphertext = XChaCha20-Poly1305-IETF(key, nonce (24 random bytes), code as UTF-8,
                                         no associated data), the 16-byte tag appended
                 (libsodium's crypto_aead_xchacha20poly1305_ietf_encrypt)
    payload    = {"version": 1, "algorithm": "argon2id-xchacha20poly1305",
                  "salt": b64, "nonce": b64, "ciphertext": b64,
                  "kdf": {"memoryKib": m, "iterations": t, "parallelism": p}}
                 (b64: standard base64 with padding)

Defaults follow OWASP's Password Storage Cheat Sheet for Argon2id (19 MiB, 2 iterations, 1 lane);
the server accepts the bounds below and nothing else.

This module depends on the standard library, PyNaCl and argon2-cffi only (no part of the server):
the SDK exposes it, the zk service's `encrypt` helper uses it, and the sandbox runs this very file
to decrypt, inside the run."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

VERSION = 1
ALGORITHM = "argon2id-xchacha20poly1305"
SALT_BYTES = 16
NONCE_BYTES = 24
KEY_BYTES = 32
TAG_BYTES = 16

# OWASP Password Storage Cheat Sheet, Argon2id: m=19 MiB, t=2, p=1.
DEFAULT_MEMORY_KIB = 19 * 1024
DEFAULT_ITERATIONS = 2
DEFAULT_PARALLELISM = 1

# What the server accepts (inclusive).
MEMORY_KIB_BOUNDS = (8 * 1024, 1024 * 1024)  # 8 MiB to 1 GiB
ITERATIONS_BOUNDS = (1, 10)
PARALLELISM_BOUNDS = (1, 4)

WRONG_PASSWORD_MESSAGE = "the password is wrong or the payload was altered"


class PayloadError(ValueError):
    """The payload is malformed or outside the recipe's bounds; the message says which field."""


class NotText(PayloadError):
    """Authentic, but the decrypted bytes are not UTF-8 text: someone encrypted other bytes."""


class DecryptionFailed(Exception):
    """The password is wrong or the payload was altered (the two cannot be told apart)."""

    def __init__(self) -> None:
        super().__init__(WRONG_PASSWORD_MESSAGE)


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int = DEFAULT_MEMORY_KIB
    iterations: int = DEFAULT_ITERATIONS
    parallelism: int = DEFAULT_PARALLELISM

    def check(self) -> None:
        """PayloadError unless every parameter is within the bounds the server accepts."""
        for name, value, (low, high), unit in (
            ("memoryKib", self.memory_kib, MEMORY_KIB_BOUNDS, " KiB"),
            ("iterations", self.iterations, ITERATIONS_BOUNDS, ""),
            ("parallelism", self.parallelism, PARALLELISM_BOUNDS, ""),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PayloadError(f"kdf.{name} must be an integer from {low} to {high}{unit}, got {value!r}")


@dataclass(frozen=True)
class ZkPayload:
    salt: bytes
    nonce: bytes
    ciphertext: bytes
    kdf: KdfParams
    version: int = VERSION
    algorithm: str = ALGORITHM

    def check(self) -> None:
        """PayloadError naming the first field that is not as the recipe says."""
        if self.version != VERSION:
            raise PayloadError(f"version must be {VERSION}, got {self.version!r}")
        if self.algorithm != ALGORITHM:
            raise PayloadError(f"algorithm must be {ALGORITHM!r}, got {self.algorithm!r}")
        if len(self.salt) != SALT_BYTES:
            raise PayloadError(f"salt must be {SALT_BYTES} bytes, got {len(self.salt)}")
        if len(self.nonce) != NONCE_BYTES:
            raise PayloadError(f"nonce must be {NONCE_BYTES} bytes, got {len(self.nonce)}")
        if len(self.ciphertext) <= TAG_BYTES:
            raise PayloadError(
                f"ciphertext must be longer than its {TAG_BYTES}-byte tag, got {len(self.ciphertext)} bytes"
            )
        self.kdf.check()

    def to_json(self) -> dict[str, Any]:
        """The payload as JSON data (bytes in standard base64), as the API takes and answers it."""
        return {
            "version": self.version,
            "algorithm": self.algorithm,
            "salt": _b64(self.salt),
            "nonce": _b64(self.nonce),
            "ciphertext": _b64(self.ciphertext),
            "kdf": {
                "memoryKib": self.kdf.memory_kib,
                "iterations": self.kdf.iterations,
                "parallelism": self.kdf.parallelism,
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> ZkPayload:
        """A checked payload from JSON data; PayloadError naming what is wrong."""
        if not isinstance(data, dict):
            raise PayloadError("a payload must be a JSON object")
        kdf = data.get("kdf")
        if not isinstance(kdf, dict):
            raise PayloadError("kdf must be an object {memoryKib, iterations, parallelism}")
        payload = cls(
            version=data.get("version"),  # type: ignore[arg-type]  # checked below
            algorithm=data.get("algorithm"),  # type: ignore[arg-type]  # checked below
            salt=_unb64(data, "salt"),
            nonce=_unb64(data, "nonce"),
            ciphertext=_unb64(data, "ciphertext"),
            kdf=KdfParams(kdf.get("memoryKib"), kdf.get("iterations"), kdf.get("parallelism")),  # type: ignore[arg-type]  # checked below
        )
        payload.check()
        return payload


def derive_key(password: str, salt: bytes, kdf: KdfParams) -> bytes:
    """Argon2id (version 0x13) of the password's UTF-8 bytes: a 32-byte key."""
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(
        secret=password.encode("utf-8"),
        salt=salt,
        time_cost=kdf.iterations,
        memory_cost=kdf.memory_kib,
        parallelism=kdf.parallelism,
        hash_len=KEY_BYTES,
        type=Type.ID,
        version=19,
    )


def encrypt(code: str, password: str, kdf: KdfParams | None = None) -> ZkPayload:
    """Encrypt `code` under `password` with a fresh random salt and nonce."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    kdf = kdf or KdfParams()
    kdf.check()
    if not password:
        raise PayloadError("a password is required")
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    key = derive_key(password, salt, kdf)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(code.encode("utf-8"), None, nonce, key)
    return ZkPayload(salt=salt, nonce=nonce, ciphertext=ciphertext, kdf=kdf)


def decrypt(payload: ZkPayload, password: str) -> str:
    """The code, or DecryptionFailed when the password is wrong or the payload was altered."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
    from nacl.exceptions import CryptoError

    payload.check()
    key = derive_key(password, payload.salt, payload.kdf)
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(payload.ciphertext, None, payload.nonce, key)
    except CryptoError:
        raise DecryptionFailed() from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        # Authentic, but not what this recipe encrypts: someone encrypted other bytes.
        raise NotText("the decrypted code is not UTF-8 text") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: dict[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str):
        raise PayloadError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"{name} is not valid standard base64") from None
