"""API keys: who is calling, from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are configured as SHA-256 digests mapped to a client identity; the key a caller presents is
hashed and compared with every configured digest in constant time. The identity, never the key,
goes into ``client_id`` and the client quota. With no keys configured, authentication is off
and callers are told apart by their address (for the quota only).

:func:`authenticate` runs from the headers alone, in the app's ``Authenticate`` middleware,
before anything reads the body: a caller without a valid key gets its 401/403 without a byte of
its body read or parsed. Failed authentications count against a budget per peer address
(:class:`~llmstream.ingress.quota.ClientQuota`); once it is spent, that address gets 429.
:data:`CallerDep` is what every ``/v1`` route depends on: the identity the middleware found.

:meth:`Identity.may_see` is the one visibility rule: with keys on, a request is shown only to
the client it positively belongs to (:func:`~llmstream.ingress.results.owner`); a request that
belongs to nobody is shown to nobody.
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
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from llmstream.ingress.errors import ApiError, unavailable
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.parts import part
from llmstream.ingress.quota import ClientQuota, Decision
from llmstream.ingress.results import Stored, owner

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="llmstream"'}


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller of one HTTP request."""

    client_id: str | None  # the API key's client identity; None when authentication is off
    rate_key: str  # what the rate limit counts against

    def may_see(self, stored: Stored) -> bool:
        """Whether this caller may learn anything of the request ``stored``: with keys on, only
        when it is positively the caller's; with authentication off, always."""
        return self.client_id is None or owner(stored) == self.client_id


class ApiKeys:
    """The configured keys (as digests) and the check of a presented key."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._keys = [(bytes.fromhex(digest), client) for digest, client in digests.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, key: str | None) -> Identity:
        """The caller presenting ``key``: 401 without a key, 403 for a key not configured."""
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


# Declared on every /v1 route for the OpenAPI document's security schemes; the key itself is
# read by `authenticate`, from the headers, before the route runs.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

# Where the middleware leaves the identity for the route (the request's scope state).
IDENTITY = "llmstream_identity"


def presented_key(headers: Headers) -> str | None:
    """The key of ``Authorization: Bearer <key>``, else of ``X-API-Key``; None without one."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None


async def authenticate(request: HTTPConnection) -> Identity:
    """The caller, from the headers alone, counted against its quota.

    Raises ApiError: 401/403 for a missing or wrong key, 429 for a missing or wrong key once the
    caller's address has spent its failure budget, or once the client has spent its quota; 503
    without Redis. A valid key is never refused for its address's failures: behind a load
    balancer or NAT many clients share one address, and one of them guessing must not lock the
    others out (keys are long random secrets: the budget makes guessing slow, not possible).
    """
    keys = part(request, "api_keys", ApiKeys)
    metrics = part(request, "metrics", IngressMetrics)
    quota = part(request, "quota", ClientQuota)
    peer = f"peer:{request.client.host if request.client else 'unknown'}"
    try:
        if keys.enabled:
            try:
                identity = keys.identify(presented_key(request.headers))
            except ApiError as exc:
                metrics.auth_failures.labels(
                    "missing" if exc.status == 401 else "not_allowed"
                ).inc()
                failure = await quota.failed(peer)
                if not failure.allowed:
                    metrics.rate_limited.inc()
                    raise _too_many_failures(failure) from None
                raise
        else:
            identity = Identity(client_id=None, rate_key=peer)
        decision = await quota.acquire(identity.rate_key)
    except RedisError:
        raise unavailable("Redis") from None
    if not decision.allowed:
        metrics.rate_limited.inc()
        raise decision.refusal()
    return identity


def _too_many_failures(decision: Decision) -> ApiError:
    return decision.refusal(
        "too many failed authentications from this address", code="too_many_auth_failures"
    )


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Identity:
    """The identity the ``Authenticate`` middleware found; a router served without it (a test
    app) authenticates here instead."""
    del credentials, api_key  # for the OpenAPI document only; see `presented_key`
    identity = request.scope.get("state", {}).get(IDENTITY)
    if isinstance(identity, Identity):
        return identity
    return await authenticate(request)


CallerDep = Annotated[Identity, Depends(caller)]
