"""Throwaway certificates for TLS tests: two unrelated CAs, server and client certificates.

EC P-256 keys keep generation to milliseconds. Server certificates name
"localhost" and 127.0.0.1, so a channel to 127.0.0.1 verifies without a name
override; certificates valid for other names need `grpc.ssl_target_name_override`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FOR = datetime.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raptorflow tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
    )


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, as PEM bytes, and the files they were written to."""

    cert_pem: bytes
    key_pem: bytes
    cert_file: Path
    key_file: Path
    serial: int

    def write_to(self, cert_file: Path, key_file: Path) -> None:
        """Replaces the two files atomically (each one: write aside, then rename over)."""
        for path, data in ((cert_file, self.cert_pem), (key_file, self.key_pem)):
            aside = path.with_name(path.name + ".new")
            aside.write_bytes(data)
            os.replace(aside, path)


class Authority:
    """A self-signed CA that issues server and client certificates into `directory`."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(f"{name} CA")
        self._subject = subject
        self.cert = (
            _builder(subject, subject, self._key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_file = directory / f"{name}-ca.pem"
        self.cert_file.write_bytes(self.cert_pem)

    def issue(
        self, file_stem: str, common_name: str, *, server: bool, hosts: tuple[str, ...] = ()
    ) -> Issued:
        """A leaf certificate: for a server (names `hosts`, default localhost and 127.0.0.1)
        or for a client; written to `<file_stem>.pem` and `<file_stem>-key.pem`."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(_name(common_name), self._subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names: list[x509.GeneralName] = []
            for host in hosts or ("localhost", "127.0.0.1"):
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert_file = self.directory / f"{file_stem}.pem"
        key_file = self.directory / f"{file_stem}-key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        return Issued(cert_pem, key_pem, cert_file, key_file, cert.serial_number)


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test module needs, generated once."""

    ca: Authority
    """The CA the servers and the good clients use."""
    other_ca: Authority
    """An unrelated CA: its certificates must be refused."""
    server: Issued
    """A server certificate of `ca` for localhost and 127.0.0.1."""
    renewed_server: Issued
    """Another server certificate of `ca` (another subject and serial), for rotation."""
    named_server: Issued
    """A server certificate of `ca` valid only for "data.internal" (needs a name override)."""
    client: Issued
    """A client certificate of `ca`."""
    other_client: Issued
    """A client certificate of `other_ca`."""

    @classmethod
    def create(cls, directory: Path) -> Pki:
        ca = Authority("test", directory)
        other_ca = Authority("other", directory)
        return cls(
            ca=ca,
            other_ca=other_ca,
            server=ca.issue("server", "raptorflow-data server", server=True),
            renewed_server=ca.issue("server-renewed", "raptorflow-data renewed", server=True),
            named_server=ca.issue(
                "server-named", "data.internal", server=True, hosts=("data.internal",)
            ),
            client=ca.issue("client", "test client", server=False),
            other_client=other_ca.issue("other-client", "stranger", server=False),
        )
