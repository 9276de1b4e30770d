"""Gives `make run` working authentication, then runs the server (a dev tool).

    python tools/dev_auth.py -- COMMAND [ARG...]

When no token key is configured (RAPTORFLOW_JWT_SECRET, RAPTORFLOW_JWT_PUBLIC_KEY_FILE,
RAPTORFLOW_JWT_JWKS_FILE) and authentication is not switched off, a random
HS256 secret is kept in .devdb/jwt-secret (created once, mode 0600) and passed
to the command as RAPTORFLOW_JWT_SECRET. With an HS256 secret in effect, an
admin token for every workspace, valid 12 hours, is printed to stderr and
written to .devdb/dev-token, so the README's grpcurl and client examples work
from the first run. The command then replaces this process (exec).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEVDB = REPO / ".devdb"
SECRET_FILE = DEVDB / "jwt-secret"
TOKEN_FILE = DEVDB / "dev-token"
KEY_SETTINGS = (
    "RAPTORFLOW_JWT_SECRET",
    "RAPTORFLOW_JWT_PUBLIC_KEY_FILE",
    "RAPTORFLOW_JWT_JWKS_FILE",
)


def _dev_secret() -> str:
    DEVDB.mkdir(exist_ok=True)
    if not SECRET_FILE.exists():
        descriptor = os.open(SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return SECRET_FILE.read_text().strip()


def _listen(command: list[str]) -> str:
    if "--listen" in command[:-1]:
        return command[command.index("--listen") + 1]
    return os.environ.get("RAPTORFLOW_LISTEN", "127.0.0.1:50051")


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: dev_auth.py -- COMMAND [ARG...]")
    command = argv[argv.index("--") + 1 :]
    env = dict(os.environ)
    disabled = env.get("RAPTORFLOW_DEV_DISABLE_AUTH", "").lower() in {"1", "true", "yes", "on"}
    if not disabled and not any(env.get(name) for name in KEY_SETTINGS):
        env["RAPTORFLOW_JWT_SECRET"] = _dev_secret()
    if not disabled and env.get("RAPTORFLOW_JWT_SECRET"):
        from raptorflow.data.server import config
        from raptorflow.data.server.auth.tokens import mint

        settings = config.load(None, env)
        token = mint(
            settings,
            subject="make-run",
            roles=["admin"],
            workspaces=["*"],
            ttl_seconds=12 * 3600,
        )
        DEVDB.mkdir(exist_ok=True)
        descriptor = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)  # a file from before keeps its old mode otherwise
        with os.fdopen(descriptor, "w") as f:
            f.write(token + "\n")
        print(
            "\nDevelopment token (admin of every workspace, 12 h; also in .devdb/dev-token):\n"
            f"  export RAPTORFLOW_DATA_TOKEN={token}\n"
            '  grpcurl -plaintext -H "authorization: Bearer $RAPTORFLOW_DATA_TOKEN" '
            f"{_listen(command)} list\n",
            file=sys.stderr,
            flush=True,
        )
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
