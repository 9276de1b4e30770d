"""TLS and mutual TLS of the gRPC port, with certificate files reloaded on change.

`bind` opens `settings.listen` plaintext, or with TLS when `tls_cert_file` and
`tls_key_file` are set; `tls_client_ca_file` adds mutual TLS (every client must
present a certificate that chains to that bundle). The credentials are grpc's
dynamic server credentials: before every TLS handshake grpc asks
`ServerCertificates` whether the configuration changed, so a rotated certificate
(cert-manager, a Kubernetes secret update) reaches new connections without a
restart, while open connections keep the one they were set up with.

That question is asked on every new connection, from a gRPC core thread, so the
answer is cheap: one `stat` per file, and the files are read again only when a
stat result (inode, size, modification time) changed, or for two seconds after
a file was modified (timestamps are too coarse to tell two quick writes apart).
A half-written or invalid set of files never reaches grpc: the previous
configuration stays in use, and a warning is logged once for those contents.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias, cast

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from raptorflow.data.server.config import Settings

log = logging.getLogger(__name__)

CERT_SETTING: Final = "RAPTORFLOW_TLS_CERT_FILE (--tls-cert-file)"
KEY_SETTING: Final = "RAPTORFLOW_TLS_KEY_FILE (--tls-key-file)"
CLIENT_CA_SETTING: Final = "RAPTORFLOW_TLS_CLIENT_CA_FILE (--tls-client-ca-file)"

# (inode, size, modification time in ns) of each file, None for one that is missing:
# a cheap "did anything change?" key.
FileState: TypeAlias = tuple[tuple[int, int, int] | None, ...]
# Files modified less than this long ago get their contents compared on every check.
_SETTLE_NS: Final = 2_000_000_000


class CertificateError(ValueError):
    """A certificate file that cannot be used; `setting` names the setting it came from."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS port: certificate chain and key, and for mutual TLS the CA
    bundle client certificates must chain to."""

    cert_file: str
    """The server's certificate chain (leaf first)."""
    key_file: str
    """The private key of the chain's first certificate."""
    client_ca_file: str = ""
    """CA bundle for client certificates; empty: clients need none (plain TLS)."""

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mutual TLS)."""
        return bool(self.client_ca_file)

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The files the settings name, or None when TLS is off.

        Raises SystemExit (naming the settings) when only one of the certificate and the
        key is set, or when a client CA is set without them.
        """
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise SystemExit(
                f"{CERT_SETTING} and {KEY_SETTING} go together: set both to serve TLS, "
                "or neither to serve plaintext"
            )
        if not settings.tls_cert_file:
            if settings.tls_client_ca_file:
                raise SystemExit(
                    f"{CLIENT_CA_SETTING} asks for mutual TLS, which needs TLS: "
                    f"set {CERT_SETTING} and {KEY_SETTING} too"
                )
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    def named(self) -> tuple[tuple[str, str], ...]:
        """(setting, path) of each file in use."""
        files = [(CERT_SETTING, self.cert_file), (KEY_SETTING, self.key_file)]
        if self.client_ca_file:
            files.append((CLIENT_CA_SETTING, self.client_ca_file))
        return tuple(files)


@dataclass(frozen=True)
class LoadedCertificates:
    """The PEM bytes of one checked set of files, and what the log says about them."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    subject: str
    serial: int
    not_after: datetime

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The grpc configuration serving these files."""
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )

    def same_files(self, other: LoadedCertificates) -> bool:
        return (self.cert_chain, self.private_key, self.client_ca) == (
            other.cert_chain,
            other.private_key,
            other.client_ca,
        )


Contents: TypeAlias = tuple[bytes | str, ...]
"""What each file of `TlsFiles.named()` holds: its bytes, or why it could not be read."""


def read_files(files: TlsFiles) -> Contents:
    """The files' contents, in `files.named()` order; never raises."""
    contents: list[bytes | str] = []
    for _, path in files.named():
        try:
            with open(path, "rb") as file:
                contents.append(file.read())
        except OSError as exc:
            contents.append(f"cannot read {path!r}: {exc.strerror or exc}")
    return tuple(contents)


def _certificates(setting: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateError(setting, f"{path!r} holds no valid PEM certificate") from exc
    return certificates


def check(files: TlsFiles, contents: Contents | None = None) -> LoadedCertificates:
    """Checks the files (read now, unless `contents` gives what they hold): PEM
    certificates that parse, a private key that parses, needs no password and belongs
    to the chain's first certificate.

    Raises CertificateError naming the setting of the first file that fails.
    """
    data: list[bytes] = []
    for (setting, _), content in zip(files.named(), contents or read_files(files), strict=True):
        if isinstance(content, str):
            raise CertificateError(setting, content)
        data.append(content)
    chain, key_pem = data[0], data[1]
    client_ca = data[2] if files.mutual else None
    leaf = _certificates(CERT_SETTING, files.cert_file, chain)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: the key is encrypted; grpc has no way to ask for a password.
        raise CertificateError(
            KEY_SETTING,
            f"{files.key_file!r} holds no unencrypted PEM private key",
        ) from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateError(
            KEY_SETTING,
            f"the key in {files.key_file!r} does not belong to the first certificate "
            f"of {files.cert_file!r}",
        )
    if client_ca is not None:
        _certificates(CLIENT_CA_SETTING, files.client_ca_file, client_ca)
    return LoadedCertificates(
        chain,
        key_pem,
        client_ca,
        leaf.subject.rfc4514_string(),
        leaf.serial_number,
        leaf.not_valid_after_utc,
    )


def _describe(loaded: LoadedCertificates) -> str:
    return (
        f"subject {loaded.subject!r}, serial {loaded.serial:x}, "
        f"valid until {loaded.not_after.isoformat()}"
    )


def _warn_if_expired(loaded: LoadedCertificates) -> None:
    if loaded.not_after < datetime.now(UTC):
        log.warning("the TLS certificate has expired: %s", _describe(loaded))


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns)


def _settled(state: FileState) -> bool:
    """Whether every file was last modified long enough ago that a later write must change
    its modification time. File timestamps are coarse (a kernel tick or more), so a file
    written twice within one tick, at the same size, would look unchanged; until it settles,
    its contents are compared instead ("racy" files, as git calls them)."""
    now = time.time_ns()
    return all(s is None or now - s[2] > _SETTLE_NS for s in state)


class ServerCertificates:
    """The certificate-configuration fetcher grpc calls before every TLS handshake.

    Returns a new `grpc.ServerCertificateConfiguration` when the files changed and
    the new ones check out, else None ("keep the current one"). Never raises: a file
    that is missing, half written or invalid keeps the previous configuration, and
    the warning is logged once per content of the files, not once per connection.
    Safe to call from several threads (grpc calls it from its own).
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._state: FileState = ()
        self._settled = False
        self._examined: Contents = ()
        self._current: LoadedCertificates | None = None
        self.reloads = 0
        """Configurations handed to grpc after the initial one (for tests and the log)."""

    @property
    def current(self) -> LoadedCertificates:
        """The files being served; `load()` must have succeeded first."""
        if self._current is None:
            raise RuntimeError("ServerCertificates.load() has not succeeded")
        return self._current

    def _file_state(self) -> FileState:
        return tuple(_stat(path) for _, path in self.files.named())

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The initial configuration. Raises SystemExit naming the setting whose file is
        unreadable or invalid: a server must not start on certificates it cannot serve."""
        with self._lock:
            state = self._file_state()
            contents = read_files(self.files)
            try:
                loaded = check(self.files, contents)
            except CertificateError as exc:
                raise SystemExit(f"invalid TLS configuration: {exc}") from exc
            self._state, self._settled = state, _settled(state)
            self._examined, self._current = contents, loaded
        _warn_if_expired(loaded)
        return loaded.configuration()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                return self._fetch()
        except Exception:
            # Raising into grpc would only be logged there; say what happened here.
            log.exception("checking the TLS certificate files failed; keeping the current ones")
            return None

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        state = self._file_state()
        if state == self._state and self._settled:
            return None
        contents = read_files(self.files)
        if self._file_state() != state:
            # Changed while being read: look again at the next handshake.
            return None
        self._state, self._settled = state, _settled(state)
        if contents == self._examined:
            # What is served now, or what was found unusable (and said so) already.
            return None
        self._examined = contents
        try:
            loaded = check(self.files, contents)
        except CertificateError as exc:
            log.warning(
                "TLS certificate files changed but cannot be used, keeping the previous "
                "certificate (%s); if they are being replaced, this clears once all are "
                "written: %s",
                _describe(self.current),
                exc,
            )
            return None
        if loaded.same_files(self.current):
            return None
        self._current = loaded
        self.reloads += 1
        log.info("TLS certificate files changed: now serving %s", _describe(loaded))
        _warn_if_expired(loaded)
        return loaded.configuration()


def check_settings(settings: Settings) -> None:
    """Fails fast, before anything else starts: raises SystemExit naming the setting when the
    TLS settings are inconsistent or their files unusable (`bind` checks again)."""
    files = TlsFiles.from_settings(settings)
    if files is not None:
        try:
            check(files)
        except CertificateError as exc:
            raise SystemExit(f"invalid TLS configuration: {exc}") from exc


def server_credentials(
    settings: Settings,
) -> tuple[grpc.ServerCredentials, ServerCertificates] | None:
    """Dynamic TLS credentials for the gRPC port and their fetcher, or None when the
    settings ask for plaintext. Raises SystemExit for unusable TLS settings or files."""
    files = TlsFiles.from_settings(settings)
    if files is None:
        return None
    certificates = ServerCertificates(files)
    initial = certificates.load()
    # grpc takes None from the fetcher as "unchanged" (grpc-stubs types it too narrowly).
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", certificates)
    credentials = grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=files.mutual
    )
    return credentials, certificates


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Opens `settings.listen` on `server`, with TLS (and mutual TLS) when the settings ask
    for it, and returns the port. Raises SystemExit for unusable TLS settings or files, and
    RuntimeError when the address cannot be bound."""
    secure = server_credentials(settings)
    if secure is None:
        log.info("gRPC port without TLS (plaintext)")
        return server.add_insecure_port(settings.listen)
    credentials, certificates = secure
    log.info(
        "gRPC port with %s, serving %s",
        "mutual TLS (client certificates required)" if certificates.files.mutual else "TLS",
        _describe(certificates.current),
    )
    return server.add_secure_port(settings.listen, credentials)
