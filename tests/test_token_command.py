"""Development tokens: the `raptorflow-data token` command and tools/dev_auth.py (`make run`).

Both run as real subprocesses. The tokens they print are checked the way the
server checks them: by calls to the module's server (signed with the tests'
secret) or by the server's own verifier.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
import sys
import time
import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.auth.principal import Role
from raptorflow.data.server.auth.tokens import TokenVerifier
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    monitoring_service_pb2,
    monitoring_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from server_process import COMMAND, Exited, command_environment, run_command
from statuses import rpc_error
from tokens import AUDIENCE, ISSUER, TEST_JWT_SECRET, bearer

ws = workspace_service_pb2
REPO = Path(__file__).resolve().parent.parent
DEV_AUTH = REPO / "tools" / "dev_auth.py"
TIMEOUT = 10.0


def with_secret(secret: str | None) -> dict[str, str]:
    env = command_environment()
    if secret is not None:
        env["RAPTORFLOW_JWT_SECRET"] = secret
    return env


async def token_command(*args: str, secret: str | None = TEST_JWT_SECRET.decode()) -> Exited:
    return await run_command(*COMMAND, "token", *args, env=with_secret(secret))


def claims_of(token: str, secret: bytes = TEST_JWT_SECRET) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(
        token, secret, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER
    )
    return decoded


# ---------------------------------------------------------------------------
# raptorflow-data token


async def test_token_command_prints_a_token_for_exactly_that_role_and_workspace(
    server: RunningServer,
) -> None:
    workspace, other = str(uuid.uuid4()), str(uuid.uuid4())
    printed = await token_command("--role", "agent", "--workspace", workspace, "--ttl", "60")
    assert printed.returncode == 0, printed
    token = printed.stdout.strip()
    assert printed.stdout.count("\n") == 1, "one line: the token alone, for $(...)"
    claims = claims_of(token)
    assert claims["roles"] == ["agent"]
    assert claims["workspaces"] == [workspace]
    assert isinstance(claims["exp"], int)
    assert 50 <= claims["exp"] - time.time() <= 61

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
        metadata = bearer(token)
        await stub.Count(
            ws.CountRequest(workspace_id=workspace, table="campaigns"),
            metadata=metadata,
            timeout=TIMEOUT,
        )
        failure = await rpc_error(
            stub.Count(
                ws.CountRequest(workspace_id=other, table="campaigns"),
                metadata=metadata,
                timeout=TIMEOUT,
            )
        )
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "WORKSPACE_NOT_GRANTED",
        )
        monitoring = monitoring_service_pb2_grpc.MonitoringServiceStub(channel)
        failure = await rpc_error(
            monitoring.GetStatus(
                monitoring_service_pb2.GetStatusRequest(), metadata=metadata, timeout=TIMEOUT
            )
        )
        assert (failure.code, failure.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "ROLE_NOT_ALLOWED",
        )


async def test_token_command_defaults_and_repeated_options() -> None:
    default, several = await asyncio.gather(
        token_command(),
        token_command(
            "--role", "memory", "--role", "job", "--workspace", "*", "--subject", "nightly"
        ),
    )
    assert default.returncode == 0, default
    claims = claims_of(default.stdout.strip())
    assert (claims["roles"], claims["workspaces"]) == (["admin"], ["*"])
    assert several.returncode == 0, several
    claims = claims_of(several.stdout.strip())
    assert (claims["roles"], claims["workspaces"], claims["sub"]) == (
        ["memory", "job"],
        ["*"],
        "nightly",
    )


@pytest.mark.parametrize(
    ("args", "secret", "words"),
    [
        pytest.param(("--role", "superuser"), TEST_JWT_SECRET.decode(), "superuser", id="bad-role"),
        pytest.param(
            ("--workspace", "not-a-uuid"), TEST_JWT_SECRET.decode(), "UUID", id="bad-workspace"
        ),
        pytest.param((), "too-short", "RAPTORFLOW_JWT_SECRET", id="short-secret"),
        pytest.param((), None, "RAPTORFLOW_JWT_SECRET", id="no-secret"),
        *(
            pytest.param(args, TEST_JWT_SECRET.decode(), words, id=case)
            for case, args, words in [
                ("ttl-nan", ("--ttl", "nan"), "ttl"),
                ("ttl-infinite", ("--ttl", "inf"), "ttl"),
                ("ttl-negative", ("--ttl", "-60"), "ttl"),
                ("ttl-zero", ("--ttl", "0"), "ttl"),
                ("empty-subject", ("--subject", ""), "subject"),
            ]
        ),
    ],
)
async def test_token_command_refuses_bad_input_with_a_message(
    args: tuple[str, ...], secret: str | None, words: str
) -> None:
    refused = await token_command(*args, secret=secret)
    assert refused.returncode != 0, refused
    assert refused.stdout == "", "no token"
    assert words in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr


# ---------------------------------------------------------------------------
# tools/dev_auth.py


@pytest.fixture
def dev_auth(tmp_path: Path) -> Path:
    """tools/dev_auth.py copied into a repository-shaped directory of the test's own.

    The tool keeps its files in `<repo>/.devdb/`, the repository being the parent of
    its own directory; a copy elsewhere keeps the developer's .devdb/ out of reach.
    """
    tools = tmp_path / "tools"
    tools.mkdir()
    copy = tools / "dev_auth.py"
    shutil.copyfile(DEV_AUTH, copy)
    return copy


PRINT_SECRET = (sys.executable, "-c", "import os; print(os.environ.get('RAPTORFLOW_JWT_SECRET'))")
"""The command dev_auth runs (exec): shows what it was given."""


def printed_token(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if "RAPTORFLOW_DATA_TOKEN=" in line]
    return line.split("RAPTORFLOW_DATA_TOKEN=", 1)[1].strip()


def verified_roles(secret: str, token: str) -> tuple[frozenset[Role], bool]:
    """What the server's own verifier makes of `token` under `secret`."""
    principal = TokenVerifier(Settings(jwt_secret=secret.encode())).verify(token)
    return principal.roles, principal.all_workspaces


async def test_dev_auth_keeps_one_private_secret_and_prints_a_token_that_verifies(
    dev_auth: Path,
) -> None:
    devdb = dev_auth.parent.parent / ".devdb"
    first = await run_command(sys.executable, str(dev_auth), "--", *PRINT_SECRET)
    assert first.returncode == 0, first
    secret_file, token_file = devdb / "jwt-secret", devdb / "dev-token"
    secret = secret_file.read_text().strip()
    assert len(secret.encode()) >= 32
    assert first.stdout.strip() == secret, "the command gets the secret"
    for path in (secret_file, token_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    token = printed_token(first.stderr)
    assert token_file.read_text().strip() == token
    assert verified_roles(secret, token) == (frozenset({Role.ADMIN}), True)
    assert 11 * 3600 < claims_of(token, secret.encode())["exp"] - time.time() <= 12 * 3600  # type: ignore[operator]

    # A second run reuses the secret: tokens printed before keep working.
    second = await run_command(sys.executable, str(dev_auth), "--", *PRINT_SECRET)
    assert second.returncode == 0, second
    assert second.stdout.strip() == secret
    assert secret_file.read_text().strip() == secret
    assert verified_roles(secret, printed_token(second.stderr))[0] == frozenset({Role.ADMIN})
    assert verified_roles(secret, token)[0] == frozenset({Role.ADMIN})


async def test_dev_auth_leaves_configured_keys_and_disabled_auth_alone(dev_auth: Path) -> None:
    devdb = dev_auth.parent.parent / ".devdb"
    own = "an-operator-chosen-secret-of-32-bytes-or-more"
    configured, disabled = await asyncio.gather(
        run_command(sys.executable, str(dev_auth), "--", *PRINT_SECRET, env=with_secret(own)),
        run_command(
            sys.executable,
            str(dev_auth),
            "--",
            *PRINT_SECRET,
            env=command_environment() | {"RAPTORFLOW_DEV_DISABLE_AUTH": "true"},
        ),
    )
    # A configured secret is used as it is (a token is still printed for it).
    assert configured.returncode == 0, configured
    assert configured.stdout.strip() == own
    assert verified_roles(own, printed_token(configured.stderr))[0] == frozenset({Role.ADMIN})
    assert not (devdb / "jwt-secret").exists()
    # Authentication off: no secret is made, no token printed.
    assert disabled.returncode == 0, disabled
    assert disabled.stdout.strip() == "None"
    assert "RAPTORFLOW_DATA_TOKEN" not in disabled.stderr
