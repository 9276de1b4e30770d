"""TLS and mutual TLS credentials for `ClientConfig.channel_credentials`, from PEM files.

::

    config = ClientConfig(
        "data.internal:50051",
        channel_credentials=tls_credentials(
            ca_file="ca.pem", cert_file="client.pem", key_file="client-key.pem"
        ),
    )

To check the server's certificate against another name than the target's host
(a certificate for "localhost" on 127.0.0.1, say), add the channel option
``("grpc.ssl_target_name_override", "localhost")`` to `ClientConfig.channel_options`.
"""

from __future__ import annotations

import os
from typing import TypeAlias

import grpc

PathLike: TypeAlias = str | os.PathLike[str]
"""A file name, as text or a path object."""

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _read(path: PathLike) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _read_certificates(path: PathLike, what: str) -> bytes:
    data = _read(path)
    if _CERTIFICATE not in data:
        raise ValueError(f"{what} {os.fspath(path)!r} holds no PEM certificate")
    return data


def _read_key(path: PathLike) -> bytes:
    data = _read(path)
    # PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY; gRPC cannot ask for a password.
    if b"-----BEGIN " not in data or b"PRIVATE KEY-----" not in data:
        raise ValueError(f"key_file {os.fspath(path)!r} holds no PEM private key")
    if b"ENCRYPTED PRIVATE KEY" in data:
        raise ValueError(f"key_file {os.fspath(path)!r} is encrypted; gRPC needs it unencrypted")
    return data


def tls_credentials(
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS port, read from PEM files once, now.

    `ca_file` is the bundle of CAs the server's certificate must chain to; None trusts
    the system's roots. `cert_file` (a client certificate chain) and `key_file` (its
    unencrypted private key) go together, for a server that requires mutual TLS.

    Raises ValueError when only one of `cert_file` and `key_file` is given or a file
    holds no PEM block of the expected kind, and OSError when a file cannot be read,
    so a mistake shows here rather than as UNAVAILABLE at the first call.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together: give both for mutual TLS")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_certificates(ca_file, "ca_file") if ca_file is not None else None,
        private_key=_read_key(key_file) if key_file is not None else None,
        certificate_chain=(
            _read_certificates(cert_file, "cert_file") if cert_file is not None else None
        ),
    )
