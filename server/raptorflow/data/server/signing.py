"""HMAC signing of opaque tokens (page tokens, resume tokens) with the key replicas share.

A sealed token is `base64url(body + mac)` without padding, where `mac` is the
first 16 bytes of HMAC-SHA256 over `context + body`. The context keeps tokens
of one kind from ever verifying as another kind under the same key; page tokens
use the empty context, which is how they were signed before this module existed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

MAC_BYTES = 16


class Signer:
    """Seals and opens tokens with one key, for one kind of token."""

    def __init__(self, key: bytes, context: bytes = b"") -> None:
        if not key:
            raise ValueError("a signing key is required")
        self._key = key
        self._context = context

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, self._context + body, hashlib.sha256).digest()[:MAC_BYTES]

    def seal(self, body: bytes) -> str:
        """The signed token of `body`, as URL-safe text."""
        return base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode()

    def open(self, token: str) -> bytes | None:
        """The body of a token this signer sealed; None if it is malformed, altered or foreign."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < MAC_BYTES:
            return None
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        return body
