"""The client-side recipe (services/zk/recipe.py) against an independent implementation of the
README's steps with plain PyNaCl and argon2-cffi, both ways, and its bounds."""

from __future__ import annotations

import base64
import os

import nacl.bindings
import pytest
from argon2.low_level import Type, hash_secret_raw

from services.zk import recipe

FAST = recipe.KdfParams(memory_kib=8192, iterations=1, parallelism=2)


def independent_key(password: str, salt: bytes, m: int, t: int, p: int) -> bytes:
    return hash_secret_raw(
        password.encode(), salt, time_cost=t, memory_cost=m, parallelism=p, hash_len=32, type=Type.ID
    )


def test_the_modules_payload_decrypts_independently() -> None:
    payload = recipe.encrypt("print('ünïcode')", "pw", FAST).to_json()
    assert payload["kdf"] == {"memoryKib": 8192, "iterations": 1, "parallelism": 2}
    key = independent_key("pw", base64.b64decode(payload["salt"]), 8192, 1, 2)
    plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        base64.b64decode(payload["ciphertext"]), None, base64.b64decode(payload["nonce"]), key
    )
    assert plain.decode() == "print('ünïcode')"


def test_an_independent_payload_decrypts_with_the_module() -> None:
    salt, nonce = os.urandom(16), os.urandom(24)
    key = independent_key("pässword", salt, 8192, 2, 1)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"echo hi", None, nonce, key)
    data = {
        "version": 1,
        "algorithm": "argon2id-xchacha20poly1305",
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
        "kdf": {"memoryKib": 8192, "iterations": 2, "parallelism": 1},
    }
    assert recipe.decrypt(recipe.ZkPayload.from_json(data), "pässword") == "echo hi"
    with pytest.raises(recipe.DecryptionFailed, match="^the password is wrong or the payload was altered$"):
        recipe.decrypt(recipe.ZkPayload.from_json(data), "password")


def test_defaults_are_owasps_and_bounds_are_enforced() -> None:
    assert recipe.KdfParams() == recipe.KdfParams(19456, 2, 1)
    for kdf, message in (
        (recipe.KdfParams(8191, 1, 1), "kdf.memoryKib must be an integer from 8192 to 1048576 KiB, got 8191"),
        (
            recipe.KdfParams(1048577, 1, 1),
            "kdf.memoryKib must be an integer from 8192 to 1048576 KiB, got 1048577",
        ),
        (recipe.KdfParams(8192, 0, 1), "kdf.iterations must be an integer from 1 to 10, got 0"),
        (recipe.KdfParams(8192, 1, 5), "kdf.parallelism must be an integer from 1 to 4, got 5"),
    ):
        with pytest.raises(recipe.PayloadError) as refused:
            recipe.encrypt("x", "pw", kdf)
        assert str(refused.value) == message
    good = recipe.encrypt("x", "pw", FAST).to_json()
    for change, message in (
        ({"salt": "not base64!"}, "salt is not valid standard base64"),
        ({"nonce": base64.b64encode(b"n" * 12).decode()}, "nonce must be 24 bytes, got 12"),
        (
            {"kdf": {"memoryKib": "8192", "iterations": 1, "parallelism": 1}},
            "kdf.memoryKib must be an integer from 8192 to 1048576 KiB, got '8192'",
        ),
    ):
        with pytest.raises(recipe.PayloadError) as refused:
            recipe.ZkPayload.from_json({**good, **change})
        assert str(refused.value) == message


def test_a_flipped_bit_anywhere_is_refused() -> None:
    payload = recipe.encrypt("print(1)", "pw", FAST)
    for field in ("ciphertext", "nonce", "salt"):
        altered = bytearray(getattr(payload, field))
        altered[0] ^= 0x80
        changed = recipe.ZkPayload(**{**payload.__dict__, field: bytes(altered)})
        with pytest.raises(recipe.DecryptionFailed):
            recipe.decrypt(changed, "pw")
