"""API keys: who is calling, from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are configured as SHA-256 digests mapped to a client identity; the key a caller presents is
hashed and compared with every configured digest in constant time. The identity, never the key,
goes into ``client_id`` and the rate limiter. With no keys configured, authentication is off and
callers are told apart by their address (for the rate limit only).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from llmstream.ingress.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="llmstream"'}


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller of one HTTP request."""

    client_id: str | None  # the API key's client identity; None when authentication is off
    rate_key: str  # what the rate limit counts against


class ApiKeys:
    """The configured keys (as digests) and the check of a presented key."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._keys = [(bytes.fromhex(digest), client) for digest, client in digests.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, key: str | None, peer: str | None) -> Identity:
        """The caller presenting ``key``: 401 without a key, 403 for a key not configured."""
        if not self._keys:
            return Identity(client_id=None, rate_key=f"peer:{peer or 'unknown'}")
        if not key:
            raise ApiError(
                401,
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                code="missing_api_key",
                headers=_CHALLENGE,
            )
        digest = hashlib.sha256(key.encode()).digest()
        found: str | None = None
        # Every digest is compared, and each comparison takes the same time whatever matches.
        for known, client in self._keys:
            if hmac.compare_digest(digest, known):
                found = client
        if found is None:
            raise ApiError(403, "this API key is not allowed", code="invalid_api_key")
        return Identity(client_id=found, rate_key=f"client:{found}")
