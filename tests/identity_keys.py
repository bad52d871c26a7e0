"""An identity key pair for services started in-process: the public key file their settings name,
and a signer for the assertions a test sends as the edge would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.platform.identity import Identity, IdentitySigner, generate_private_key_pem, public_key_pem
from services.platform.service_graph import IDENTITY_HEADER

SOME_USER = Identity("user-1", "a@example.com")


@dataclass
class Keys:
    signer: IdentitySigner
    public_key_file: Path

    def metadata(self, user: Identity) -> tuple[tuple[str, str]]:
        """gRPC metadata carrying an identity assertion for `user`."""
        return ((IDENTITY_HEADER, self.signer.sign(user)),)

    def assertion(self) -> tuple[tuple[str, str]]:
        """gRPC metadata carrying an identity assertion for some user."""
        return self.metadata(SOME_USER)


def make_keys(directory: Path) -> Keys:
    private = generate_private_key_pem()
    public_file = directory / "identity.pub"
    public_file.write_bytes(public_key_pem(private))
    return Keys(IdentitySigner(private), public_file)
