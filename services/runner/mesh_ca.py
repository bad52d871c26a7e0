"""The mesh's own certificate authority: the identities internal calls are made with.

On one machine the runner is the CA. It keeps a CA key and certificate in the data directory
(keys/mesh/ca.key, ca.pem; created once, kept across restarts) and issues, at every start, a
certificate and key per identity: every built service, the edge (Envoy) and the runner itself
(its health checks). Each certificate names its identity as its only DNS subject alternative
name, which is what a caller checks (a client of "audit" accepts only a certificate naming
"audit") and what a server's peer presents.

Rotation: leaf certificates are issued afresh at every `pyth-on up` (a restart rotates them);
the CA is replaced by deleting keys/mesh/ and starting again (every leaf is re-issued from the
new CA at once, as all parts of a local mesh restart together). In Kubernetes the same files
come from a Secret or cert-manager's Certificates (one per service, the service's name as SAN)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
# Re-issued at every start, so this only bounds how long one `pyth-on up` may run.
LEAF_VALIDITY = datetime.timedelta(days=365)
# Clocks of a machine's processes agree; a minute covers a certificate used the instant it is made.
_BACKDATE = datetime.timedelta(minutes=1)


@dataclass(frozen=True)
class IssuedIdentity:
    """PEM certificate and private key of one member of the mesh."""

    certificate_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class MeshCA:
    """A CA in memory; the data directory's layout keeps it in files (see layout.DataLayout)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls) -> MeshCA:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _self_signed_ca(key))

    @classmethod
    def from_pem(cls, key_pem: bytes, certificate_pem: bytes) -> MeshCA:
        """ValueError when the key is not the CA's EC key."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise ValueError("the mesh CA's key is not an EC key or does not match its certificate")
        return cls(key, certificate)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str) -> IssuedIdentity:
        """A new key and a certificate naming `name` (its CN and only DNS SAN), for server and
        client use alike."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _leaf(name, key.public_key(), self.key, self.certificate)
        return IssuedIdentity(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _self_signed_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyth-on mesh CA")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + LEAF_VALIDITY, ca_certificate.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # One certificate serves both ends: a service is a server to its callers and a client of its callees.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
