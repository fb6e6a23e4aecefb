"""API keys: who is calling, from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are configured as SHA-256 digests mapped to a client identity; the key a caller presents is
hashed and compared with every configured digest in constant time. The identity, never the key,
goes into ``client_id`` and the client quota. With no keys configured, authentication is off
and callers are told apart by their address (for the quota only).

:data:`CallerDep` is what every ``/v1`` route depends on: authentication, then the caller's
quota, in that order, before the body is validated.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from llmstream.ingress.errors import ApiError, unavailable
from llmstream.ingress.parts import MetricsDep, part
from llmstream.ingress.quota import ClientQuota

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


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def caller(
    request: Request,
    metrics: MetricsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Identity:
    """Authenticate (``app.state.api_keys``), then count the call against the caller's quota
    (``app.state.quota``)."""
    key = credentials.credentials if credentials is not None else api_key
    keys = part(request, "api_keys", ApiKeys)
    try:
        identity = keys.identify(key, request.client.host if request.client else None)
    except ApiError as exc:
        metrics.auth_failures.labels("missing" if exc.status == 401 else "not_allowed").inc()
        raise
    quota = part(request, "quota", ClientQuota)
    try:
        decision = await quota.acquire(identity.rate_key)
    except RedisError:
        raise unavailable("Redis") from None
    if not decision.allowed:
        metrics.rate_limited.inc()
        raise decision.refusal()
    return identity


CallerDep = Annotated[Identity, Depends(caller)]
