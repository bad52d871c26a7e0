"""Encrypted runs: code the executor holds only as a ZKPayload, decrypted inside the sandbox.

The executor never decrypts. It turns a sealed run into an ordinary RunSpec whose program is the
sandbox's decryptor (sandbox/zk_decryptor.py), whose private input (fd 3: never the environment,
argv or a file) carries the payload, the password and a per-run token, and whose read-only paths
add the decryption libraries (PyNaCl with the libsodium it bundles, argon2-cffi, cffi's backend,
the recipe) with the shared libraries they link. Python code is decrypted and run by the Python
runtime; JavaScript and Bash code by the Bash root, which holds python3 and node too: the
decryptor execs the program's interpreter in the same sandbox.

A run the decryptor refused (wrong password or altered payload, a key derivation over the memory
limit) is told from anything the program could print by its reserved exit status, its marker at
the start of stderr and this run's random token, which the program never sees: it never ran."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.executor.sandbox import RunResult, RunSpec, zk_decryptor
from services.executor.sandbox.interface import MiB
from services.executor.sandbox.runtimes import linked_libraries
from services.platform.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.zk import recipe

DECRYPTOR_INSIDE = "/opt/pythonon-zk/decrypt.py"
# What the interpreter, the libraries and the decryptor take besides the key derivation's memory.
KDF_HEADROOM_BYTES = 48 * MiB
# The runtime an encrypted run of each language is decrypted in (the Bash root holds python3 and node).
DECRYPTING_RUNTIME = {"python": "python", "javascript": "bash", "bash": "bash"}

REFUSALS: dict[str, tuple[type[PermissionDenied | InvalidArgument], str]] = {
    "wrong-password": (PermissionDenied, recipe.WRONG_PASSWORD_MESSAGE),
    "malformed": (InvalidArgument, "the payload is not as the recipe describes"),
    "not-text": (InvalidArgument, "the decrypted code is not UTF-8 text"),
    "kdf-memory": (
        InvalidArgument,
        "the payload's key derivation could not get its memory within the run's memory limit",
    ),
}


@dataclass(frozen=True)
class SealedCode:
    """Code to run that only the sandbox will see in clear."""

    payload: recipe.ZkPayload
    password: str
    # Random per run: the decryptor's refusal names it, the program never sees it.
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    def check(self, memory_bytes: int, max_code_bytes: int) -> None:
        """Refuse before any sandbox starts: a malformed payload, no password, a ciphertext larger
        than the code a run may have, or a key derivation that would not fit the run's memory."""
        try:
            self.payload.check()
        except recipe.PayloadError as error:
            raise InvalidArgument(f"payload: {error}") from None
        if not self.password:
            raise InvalidArgument("a password is required")
        if len(self.payload.ciphertext) - recipe.TAG_BYTES > max_code_bytes:
            raise InvalidArgument(f"code is larger than {max_code_bytes // 1024} KiB")
        needed = self.payload.kdf.memory_kib * 1024 + KDF_HEADROOM_BYTES
        if needed > memory_bytes:
            raise InvalidArgument(
                f"the payload's key derivation needs {self.payload.kdf.memory_kib // 1024} MiB of memory "
                f"(kdf.memoryKib={self.payload.kdf.memory_kib}), more than a run's memory limit of "
                f"{memory_bytes // MiB} MiB allows with the interpreter; encrypt it with less memory"
            )

    def audit_details(self) -> dict[str, object]:
        """What the audit log keeps of it: digests and sizes, never the code or the password."""
        return {
            "encrypted": True,
            "codeSha256": hashlib.sha256(self.payload.ciphertext).hexdigest(),
            "codeBytes": len(self.payload.ciphertext),
        }

    def spec(self, plain: RunSpec, available: list[str]) -> RunSpec:
        """The RunSpec that decrypts and runs it: `plain` (language, stdin, env, limits, owner) with
        the decryptor as its program."""
        runtime = DECRYPTING_RUNTIME[plain.language]
        if runtime not in available:
            raise FailedPrecondition(
                f"encrypted {plain.language} code is decrypted in the {runtime} sandbox, which is not "
                "available on this server"
            )
        private = json.dumps(
            {
                "token": self.token,
                "language": plain.language,
                "password": self.password,
                "payload": self.payload.to_json(),
            }
        ).encode()
        code = (
            decryptor_source()
            if runtime == "python"
            else f"exec /usr/bin/python3 -I -S -B {DECRYPTOR_INSIDE}\n"
        )
        return replace(
            plain,
            language=runtime,
            code=code,
            private_input=private,
            readonly_paths=[*plain.readonly_paths, *decryptor_binds()],
        )

    def refusal(self, result: RunResult) -> tuple[str, PermissionDenied | InvalidArgument] | None:
        """(reason, error) when the decryptor refused to run the code; None when the code ran."""
        if result.exit_code != zk_decryptor.REFUSED_STATUS:
            return None
        prefix = zk_decryptor.MARKER.decode() + self.token + " "
        if not result.stderr.startswith(prefix):
            return None
        reason = result.stderr[len(prefix) :].split("\n", 1)[0]
        error_type, message = REFUSALS.get(reason, (InvalidArgument, "the code could not be decrypted"))
        return reason, error_type(message)


def sealed_code_from(
    *,
    version: int,
    algorithm: str,
    salt: bytes,
    nonce: bytes,
    ciphertext: bytes,
    memory_kib: int,
    iterations: int,
    parallelism: int,
    password: str,
) -> SealedCode:
    return SealedCode(
        payload=recipe.ZkPayload(
            version=version,
            algorithm=algorithm,
            salt=salt,
            nonce=nonce,
            ciphertext=ciphertext,
            kdf=recipe.KdfParams(memory_kib, iterations, parallelism),
        ),
        password=password,
    )


@functools.cache
def decryptor_source() -> str:
    return Path(zk_decryptor.__file__).read_text()


@functools.cache
def decryptor_binds() -> tuple[tuple[str, str], ...]:
    """(host path, sandbox path) of what the decryptor needs besides the runtime: the packages'
    directories as they are installed for the executor (their extension modules include libsodium
    and Argon2 statically), cffi's backend, the recipe, the decryptor, and the shared libraries
    those extension modules link, resolved as the root's own are."""
    libraries = zk_decryptor.LIBRARIES
    packages = [
        _installed("nacl").parent,
        _installed("argon2").parent,
        _installed("_argon2_cffi_bindings").parent,
    ]
    backend = _installed("_cffi_backend")
    binds = [(str(package), f"{libraries}/{package.name}") for package in packages]
    binds.append((str(backend), f"{libraries}/{backend.name}"))
    binds.append((str(Path(recipe.__file__).resolve()), f"{libraries}/zk_recipe.py"))
    binds.append((str(Path(zk_decryptor.__file__).resolve()), DECRYPTOR_INSIDE))
    extensions = [str(backend), *(str(p) for package in packages for p in package.rglob("*.so"))]
    binds += linked_libraries(extensions)
    return tuple(binds)


def _installed(module: str) -> Path:
    """The file a module is loaded from (a package's __init__.py), without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LookupError(f"{module} is not installed: encrypted code cannot be decrypted in the sandbox")
    return Path(spec.origin).resolve()
