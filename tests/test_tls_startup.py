"""Unusable TLS or health-port settings stop start-up with a SystemExit naming the setting,
and leave nothing behind: no database connection, no port.

A module of its own because the leak check compares the service's backends before
and after, which a running server of another fixture would disturb.
"""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest
from conftest import start_server
from pg_activity import assert_no_new_backends, service_backends
from raptorflow.data.server.config import Settings
from server_process import free_port
from tls_helpers import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def _garbage(tmp_path: Path) -> str:
    path = tmp_path / "garbage.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return str(path)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert_file": "server"}, "RAPTORFLOW_TLS_CERT_FILE .* and RAPTORFLOW_TLS_KEY_FILE"),
        ({"tls_key_file": "server-key"}, "RAPTORFLOW_TLS_CERT_FILE .* and RAPTORFLOW_TLS_KEY_FILE"),
        ({"tls_client_ca_file": "ca"}, "RAPTORFLOW_TLS_CLIENT_CA_FILE .* needs TLS"),
        (
            {"tls_cert_file": "missing", "tls_key_file": "server-key"},
            "RAPTORFLOW_TLS_CERT_FILE .* cannot read",
        ),
        (
            {"tls_cert_file": "garbage", "tls_key_file": "server-key"},
            "RAPTORFLOW_TLS_CERT_FILE .* no valid PEM certificate",
        ),
        (
            {"tls_cert_file": "server", "tls_key_file": "client-key"},
            "RAPTORFLOW_TLS_KEY_FILE .* does not belong",
        ),
        (
            {"tls_cert_file": "server", "tls_key_file": "server"},
            "RAPTORFLOW_TLS_KEY_FILE .* no unencrypted PEM private key",
        ),
        (
            {
                "tls_cert_file": "server",
                "tls_key_file": "server-key",
                "tls_client_ca_file": "garbage",
            },
            "RAPTORFLOW_TLS_CLIENT_CA_FILE .* no valid PEM certificate",
        ),
    ],
)
async def test_unusable_tls_settings_stop_start_up_cleanly(
    settings: Settings,
    pki: Pki,
    tmp_path: Path,
    db: asyncpg.Connection,
    files: dict[str, str],
    message: str,
) -> None:
    paths = {
        "server": str(pki.server.cert_file),
        "server-key": str(pki.server.key_file),
        "client-key": str(pki.client.key_file),
        "ca": str(pki.ca.cert_file),
        "missing": str(tmp_path / "missing.pem"),
        "garbage": _garbage(tmp_path),
    }
    before = set(await service_backends(db))
    with pytest.raises(SystemExit, match=message):
        await start_server(settings, **{name: paths[key] for name, key in files.items()})
    await assert_no_new_backends(db, before)


async def test_a_taken_health_port_stops_start_up_cleanly(
    settings: Settings, db: asyncpg.Connection
) -> None:
    main_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = set(await service_backends(db))
        with pytest.raises(SystemExit, match="RAPTORFLOW_HEALTH_LISTEN"):
            await start_server(
                settings, listen=f"127.0.0.1:{main_port}", health_listen=f"127.0.0.1:{port}"
            )
    await assert_no_new_backends(db, before)
    with socket.socket() as main:
        main.bind(("127.0.0.1", main_port))  # the gRPC port was released, too
