"""The zero-knowledge recipe on the client's side: code encrypted under a password into a payload
the server stores but cannot read (README of the server, "Zero-knowledge code"):

    key        = Argon2id v0x13 (password as UTF-8, salt of 16 random bytes, iterations, memoryKib,
                 parallelism, 32-byte output)
    ciphertext = XChaCha20-Poly1305-IETF (key, nonce of 24 random bytes, code as UTF-8, no associated
                 data), the 16-byte tag appended
    payload    = {"version": 1, "algorithm": "argon2id-xchacha20poly1305", "salt", "nonce",
                  "ciphertext" (standard base64), "kdf": {"memoryKib", "iterations", "parallelism"}}

Written from that description, importing nothing of the server; the SDK's tests check it against
the server's own implementation both ways and through a real run.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

VERSION = 1
ALGORITHM = "argon2id-xchacha20poly1305"
SALT_BYTES = 16
NONCE_BYTES = 24
# What the server accepts (inclusive); OWASP's Argon2id defaults: 19 MiB, 2 iterations, 1 lane.
MEMORY_KIB_BOUNDS = (8 * 1024, 1024 * 1024)
ITERATIONS_BOUNDS = (1, 10)
PARALLELISM_BOUNDS = (1, 4)


class WrongPassword(Exception):
    """The password is wrong or the payload was altered (the two cannot be told apart)."""


@dataclass(frozen=True)
class Kdf:
    """Argon2id's cost. More memory makes guessing dearer; the run decrypting it must have room."""

    memory_kib: int = 19 * 1024
    iterations: int = 2
    parallelism: int = 1

    def __post_init__(self) -> None:
        for name, value, (low, high) in (
            ("memory_kib", self.memory_kib, MEMORY_KIB_BOUNDS),
            ("iterations", self.iterations, ITERATIONS_BOUNDS),
            ("parallelism", self.parallelism, PARALLELISM_BOUNDS),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class ZkPayload:
    """Encrypted code, as `zk.put` stores it."""

    salt: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    kdf: Kdf = Kdf()
    version: int = VERSION
    algorithm: str = ALGORITHM

    def to_json(self) -> dict[str, Any]:
        """The payload's JSON form, as the API takes and answers it."""
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
    def from_json(cls, data: Mapping[str, Any]) -> ZkPayload:
        """A payload from its JSON form; ValueError naming what is missing or malformed."""
        kdf = data.get("kdf")
        if not isinstance(kdf, dict):
            raise ValueError("kdf must be an object {memoryKib, iterations, parallelism}")
        return cls(
            salt=_unb64(data, "salt"),
            nonce=_unb64(data, "nonce"),
            ciphertext=_unb64(data, "ciphertext"),
            kdf=Kdf(kdf.get("memoryKib"), kdf.get("iterations"), kdf.get("parallelism")),  # type: ignore[arg-type]  # Kdf checks them
            version=data.get("version"),  # type: ignore[arg-type]  # sent as is; the server checks
            algorithm=data.get("algorithm"),  # type: ignore[arg-type]
        )


def _key(password: str, salt: bytes, kdf: Kdf) -> bytes:
    return hash_secret_raw(
        secret=password.encode("utf-8"),
        salt=salt,
        time_cost=kdf.iterations,
        memory_cost=kdf.memory_kib,
        parallelism=kdf.parallelism,
        hash_len=32,
        type=Type.ID,
        version=19,
    )


def encrypt_local(code: str, password: str, kdf: Kdf | None = None) -> ZkPayload:
    """Encrypt `code` under `password` on this machine, with a fresh random salt and nonce; neither
    the code nor the password leaves the process."""
    if not password:
        raise ValueError("a password is required")
    kdf = kdf or Kdf()
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(
        code.encode("utf-8"), None, nonce, _key(password, salt, kdf)
    )
    return ZkPayload(salt=salt, nonce=nonce, ciphertext=ciphertext, kdf=kdf)


def decrypt_local(payload: ZkPayload, password: str) -> str:
    """The code of a payload; WrongPassword when the password is wrong or the payload was altered."""
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            payload.ciphertext, None, payload.nonce, _key(password, payload.salt, payload.kdf)
        )
    except CryptoError:
        raise WrongPassword("the password is wrong or the payload was altered") from None
    return plain.decode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Mapping[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid standard base64") from None
