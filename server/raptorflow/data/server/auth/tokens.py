"""Bearer tokens: JWTs verified with PyJWT against the configured keys, into a `Principal`.

A token is accepted when its signature verifies with a configured key of its
algorithm (HS256 with jwt_secret; RS256 or ES256 with jwt_public_key_file or,
chosen by `kid`, a key of jwt_jwks_file), and its `exp` (required), `nbf`, `iss`
and `aud` hold, with jwt_leeway_seconds of clock skew. Its claims:

- `sub` (required): who the caller is;
- `role` (a string) or `roles` (a list): agent, job, memory, admin; other names
  are ignored, so tokens may carry roles of other services;
- `workspaces`: workspace UUIDs, or ["*"] for every workspace.

Every refusal is UNAUTHENTICATED with a reason (TOKEN_MISSING, TOKEN_MALFORMED,
TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_SIGNATURE_INVALID, TOKEN_ISSUER_INVALID,
TOKEN_AUDIENCE_INVALID, TOKEN_KEY_UNKNOWN, TOKEN_CLAIMS_INVALID); none says more
about the service than that.

Verified tokens are cached by their text, so a caller that sends the same token
on every call pays for the signature once; expiry is still checked on every use.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from raptorflow.data.server.auth.principal import Principal, Role
from raptorflow.data.server.config import Settings
from raptorflow.data.server.errors import Code, ServiceError

log = logging.getLogger(__name__)

ALL_WORKSPACES = "*"
MIN_SECRET_BYTES = 32
"""RFC 7518 section 3.2: an HS256 key must be at least as long as the hash (256 bits)."""
MAX_TOKEN_CHARS = 8192
MAX_WORKSPACES = 10_000
MAX_MINTED_TTL_SECONDS = 366 * 24 * 3600
_CACHE_SIZE = 4096
_JWKS_CHECK_SECONDS = 1.0
_ROLES_BY_NAME = {role.value: role for role in Role}


def unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(Code.UNAUTHENTICATED, reason, message)


class UnusableKey(Exception):
    """A configured key cannot be used (start-up stops with the setting's name)."""


@dataclass(frozen=True)
class _Keys:
    secret: bytes
    public_key: Any | None  # RSAPublicKey | EllipticCurvePublicKey
    jwks: Mapping[str, tuple[str, Any]]  # kid -> (algorithm, key)


def _algorithm_of(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnusableKey(f"ES256 needs a P-256 key, not {key.curve.name}")
        return "ES256"
    raise UnusableKey(f"not an RSA or EC public key: {type(key).__name__}")


def load_public_key(path: str) -> Any:
    """The public key of a PEM file (RS256 or ES256)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise UnusableKey(f"{path} holds no PEM public key: {exc}") from None
    _algorithm_of(key)
    return key


def load_jwks(path: str) -> dict[str, tuple[str, Any]]:
    """kid -> (algorithm, public key) of a JWKS file's RS256 and ES256 signing keys."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        key_set = jwt.PyJWKSet.from_json(text)
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError) as exc:
        raise UnusableKey(f"{path} is not a usable JWKS: {exc}") from None
    keys: dict[str, tuple[str, Any]] = {}
    for jwk in key_set.keys:
        if jwk.public_key_use not in (None, "sig") or not jwk.key_id:
            continue
        try:
            algorithm = _algorithm_of(jwk.key)
        except UnusableKey:
            continue  # HMAC or other keys: never accepted from a key set
        if jwk.algorithm_name not in (algorithm, None, ""):
            continue
        keys[jwk.key_id] = (algorithm, jwk.key)
    if not keys:
        raise UnusableKey(f"{path} has no RS256 or ES256 signing key with a kid")
    return keys


class TokenVerifier:
    """Verifies bearer tokens into principals with the keys the settings name."""

    def __init__(self, settings: Settings) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds
        self._jwks_file = settings.jwt_jwks_file
        self._jwks_stamp: tuple[float, int] | None = None
        self._jwks_checked = 0.0
        secret = settings.jwt_secret
        if secret and len(secret) < MIN_SECRET_BYTES:
            raise SystemExit(
                f"RAPTORFLOW_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long "
                f"(it has {len(secret)})"
            )
        public_key = None
        if settings.jwt_public_key_file:
            try:
                public_key = load_public_key(settings.jwt_public_key_file)
            except (OSError, UnusableKey) as exc:
                raise SystemExit(f"invalid RAPTORFLOW_JWT_PUBLIC_KEY_FILE: {exc}") from None
        jwks: Mapping[str, tuple[str, Any]] = {}
        if self._jwks_file:
            try:
                jwks = load_jwks(self._jwks_file)
                self._jwks_stamp = _stamp(self._jwks_file)
            except (OSError, UnusableKey) as exc:
                raise SystemExit(f"invalid RAPTORFLOW_JWT_JWKS_FILE: {exc}") from None
        if not secret and public_key is None and not jwks:
            raise SystemExit(
                "authentication is on but no key verifies tokens: set RAPTORFLOW_JWT_SECRET, "
                "RAPTORFLOW_JWT_PUBLIC_KEY_FILE or RAPTORFLOW_JWT_JWKS_FILE (or, for "
                "development only, RAPTORFLOW_DEV_DISABLE_AUTH=true)"
            )
        self._keys = _Keys(secret, public_key, jwks)
        self._cache: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; UNAUTHENTICATED (a ServiceError) otherwise."""
        self._maybe_reload_jwks()
        principal = self._cache.get(token)
        if principal is None:
            principal = self._decode(token)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[token] = principal
        now = time.time()
        if now >= principal.expires_at:
            raise unauthenticated("TOKEN_EXPIRED", "the bearer token has expired")
        if now < principal.not_before:
            raise unauthenticated("TOKEN_NOT_YET_VALID", "the bearer token is not valid yet")
        return principal

    def _decode(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_CHARS:
            raise unauthenticated("TOKEN_MALFORMED", "the bearer token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise unauthenticated("TOKEN_MALFORMED", "the bearer token is not a JWT") from None
        algorithm, key = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=0,  # exp and nbf are checked on every use, with the leeway
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    # iat is informational (RFC 7519 4.1.6): an issuer whose clock runs a
                    # little ahead must not break tokens; nbf and exp carry validity.
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise unauthenticated(
                "TOKEN_SIGNATURE_INVALID", "the bearer token's signature does not verify"
            ) from None
        except jwt.InvalidIssuerError:
            raise unauthenticated(
                "TOKEN_ISSUER_INVALID", "the bearer token has the wrong issuer"
            ) from None
        except jwt.InvalidAudienceError:
            raise unauthenticated(
                "TOKEN_AUDIENCE_INVALID", "the bearer token is not meant for this service"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(
                "TOKEN_CLAIMS_INVALID", f"the bearer token lacks the {exc.claim!r} claim"
            ) from None
        except jwt.InvalidTokenError:
            raise unauthenticated("TOKEN_MALFORMED", "the bearer token does not decode") from None
        return self._principal(claims)

    def _key_for(self, header: Mapping[str, Any]) -> tuple[str, Any]:
        algorithm = header.get("alg")
        keys = self._keys
        if algorithm == "HS256" and keys.secret:
            return algorithm, keys.secret
        if algorithm in ("RS256", "ES256"):
            kid = header.get("kid")
            if isinstance(kid, str) and kid in keys.jwks:
                jwks_algorithm, key = keys.jwks[kid]
                if jwks_algorithm == algorithm:
                    return algorithm, key
            elif keys.public_key is not None and _algorithm_of(keys.public_key) == algorithm:
                return algorithm, keys.public_key
            raise unauthenticated(
                "TOKEN_KEY_UNKNOWN", "no configured key verifies the bearer token"
            )
        raise unauthenticated(
            "TOKEN_KEY_UNKNOWN", "the bearer token's algorithm is not accepted here"
        )

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise _claims_invalid("sub must be a non-empty string")
        roles = _roles(claims)
        all_workspaces, workspaces = _workspaces(claims.get("workspaces", []))
        return Principal(
            subject=subject[:200],
            roles=roles,
            workspaces=workspaces,
            all_workspaces=all_workspaces,
            not_before=_time_claim(claims, "nbf", -math.inf) - self._leeway,
            expires_at=_time_claim(claims, "exp", math.inf) + self._leeway,
        )

    def _maybe_reload_jwks(self) -> None:
        if not self._jwks_file:
            return
        now = time.monotonic()
        if now - self._jwks_checked < _JWKS_CHECK_SECONDS:
            return
        self._jwks_checked = now
        try:
            stamp = _stamp(self._jwks_file)
            if stamp == self._jwks_stamp:
                return
            jwks = load_jwks(self._jwks_file)
        except (OSError, UnusableKey) as exc:
            if self._jwks_stamp is not None:
                log.warning("keeping the previous JWKS: %s", exc)
                self._jwks_stamp = None  # warn once per bad version
            return
        self._keys = _Keys(self._keys.secret, self._keys.public_key, jwks)
        self._jwks_stamp = stamp
        self._cache.clear()
        log.info("reloaded the JWKS %s (%d keys)", self._jwks_file, len(jwks))


def _stamp(path: str) -> tuple[float, int]:
    info = os.stat(path)
    return info.st_mtime, info.st_size


def _claims_invalid(what: str) -> ServiceError:
    return unauthenticated("TOKEN_CLAIMS_INVALID", f"the bearer token's claims are invalid: {what}")


def _time_claim(claims: Mapping[str, Any], name: str, default: float) -> float:
    value = claims.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _claims_invalid(f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise _claims_invalid(f"{name} is out of range") from None
    if not math.isfinite(number):
        raise _claims_invalid(f"{name} must be a finite number")
    return number


def _roles(claims: Mapping[str, Any]) -> frozenset[Role]:
    names: Sequence[Any]
    if "roles" in claims:
        raw = claims["roles"]
        if not isinstance(raw, list):
            raise _claims_invalid("roles must be a list of strings")
        names = raw
    elif "role" in claims:
        names = [claims["role"]]
    else:
        return frozenset()
    if not all(isinstance(name, str) for name in names):
        raise _claims_invalid("roles must be strings")
    return frozenset(_ROLES_BY_NAME[name] for name in names if name in _ROLES_BY_NAME)


def _workspaces(raw: Any) -> tuple[bool, frozenset[uuid.UUID]]:
    if not isinstance(raw, list) or len(raw) > MAX_WORKSPACES:
        raise _claims_invalid(f"workspaces must be a list of at most {MAX_WORKSPACES} UUIDs")
    if ALL_WORKSPACES in raw:
        return True, frozenset()
    workspaces = set()
    for item in raw:
        try:
            workspaces.add(uuid.UUID(item))
        except (ValueError, TypeError, AttributeError):
            raise _claims_invalid("workspaces must be UUIDs or '*'") from None
    return False, frozenset(workspaces)


def mint(
    settings: Settings,
    *,
    subject: str,
    roles: Sequence[str],
    workspaces: Sequence[str],
    ttl_seconds: float,
) -> str:
    """An HS256 token signed with settings.jwt_secret (the `token` command, `make run`).

    For development and for deployments that hand out HS256 tokens themselves;
    RS256/ES256 tokens come from the identity provider holding the private key.
    """
    if len(settings.jwt_secret) < MIN_SECRET_BYTES:
        raise SystemExit(
            f"minting needs RAPTORFLOW_JWT_SECRET of at least {MIN_SECRET_BYTES} bytes"
        )
    if not math.isfinite(ttl_seconds) or not 0 < ttl_seconds <= MAX_MINTED_TTL_SECONDS:
        raise SystemExit("--ttl must be a number of seconds above 0 and at most a year")
    if not subject:
        raise SystemExit("--subject must not be empty")
    unknown = sorted(set(roles) - set(_ROLES_BY_NAME))
    if unknown or not roles:
        raise SystemExit(f"roles must be some of {', '.join(_ROLES_BY_NAME)}, not {unknown}")
    try:
        _workspaces(list(workspaces))
    except ServiceError:
        raise SystemExit("--workspace takes workspace UUIDs, or '*' for every workspace") from None
    now = time.time()
    payload: dict[str, Any] = {
        "sub": subject,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": int(now),
        "exp": int(now + ttl_seconds),
        "roles": list(roles),
        "workspaces": list(workspaces),
    }
    return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")
