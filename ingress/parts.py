"""The parts of the ingress as routes get them: from ``request.app.state``.

:func:`~llmstream.ingress.app.create_app` puts the settings, the metrics, the API keys and the
model catalog there when it builds the app, and the connected parts (Redis, the producer, the
ledger, the publisher, the response listener, the chunk hub, the client quota) while the app
runs. A route asks for what it uses (``ledger: LedgerDep``), so a test can serve one router with
only those parts on ``app.state``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from starlette.requests import HTTPConnection

from llmstream.core.record import AnyRedis
from llmstream.ingress.chunks import ChunkHub
from llmstream.ingress.errors import ApiError
from llmstream.ingress.metrics import IngressMetrics
from llmstream.ingress.publish import Publisher
from llmstream.ingress.results import RequestLedger, ResponseListener
from llmstream.ingress.settings import IngressSettings

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Routes:
    """A module's route declarations; :meth:`router` builds a new ``APIRouter`` from them.

    Each app gets routers of its own, so nothing FastAPI caches on a router (it builds a route's
    state lazily, on the router) is shared between two apps in one process.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._routes: list[tuple[str, Callable[..., Any], list[str], dict[str, Any]]] = []

    def get(self, path: str, **options: Any) -> Callable[[F], F]:
        return self._add(path, "GET", options)

    def post(self, path: str, **options: Any) -> Callable[[F], F]:
        return self._add(path, "POST", options)

    def delete(self, path: str, **options: Any) -> Callable[[F], F]:
        return self._add(path, "DELETE", options)

    def websocket(self, path: str) -> Callable[[F], F]:
        return self._add(path, "WEBSOCKET", {})

    def _add(self, path: str, method: str, options: dict[str, Any]) -> Callable[[F], F]:
        def register(endpoint: F) -> F:
            self._routes.append((path, endpoint, [method], options))
            return endpoint

        return register

    def router(self) -> APIRouter:
        router = APIRouter(**self._options)
        for path, endpoint, methods, options in self._routes:
            if methods == ["WEBSOCKET"]:
                router.add_api_websocket_route(path, endpoint)
            else:
                router.add_api_route(path, endpoint, methods=methods, **options)
        return router


def part(request: HTTPConnection, name: str, kind: type[T]) -> T:
    """``app.state.<name>``; 503 while it is not there (the app is starting or stopping)."""
    value = getattr(request.app.state, name, None)
    if not isinstance(value, kind):
        raise _not_running()
    return value


def redis_part(request: Request) -> AnyRedis:
    """``app.state.redis``: a Redis client, or a Redis Cluster one (``LLMSTREAM_REDIS_CLUSTER``)."""
    value = getattr(request.app.state, "redis", None)
    if not isinstance(value, Redis | RedisCluster):
        raise _not_running()
    return value


def _not_running() -> ApiError:
    return ApiError(503, "the ingress is not running (starting or stopping)")


def _settings(request: Request) -> IngressSettings:
    return part(request, "settings", IngressSettings)


def _metrics(request: Request) -> IngressMetrics:
    return part(request, "metrics", IngressMetrics)


def _ledger(request: Request) -> RequestLedger:
    return part(request, "ledger", RequestLedger)


def _publisher(request: Request) -> Publisher:
    return part(request, "publisher", Publisher)


def _listener(request: Request) -> ResponseListener:
    return part(request, "listener", ResponseListener)


def chunk_hub(request: Request) -> ChunkHub:
    """``app.state.hub``, for a route that needs it only sometimes (a streamed chat request)."""
    return part(request, "hub", ChunkHub)


SettingsDep = Annotated[IngressSettings, Depends(_settings)]
MetricsDep = Annotated[IngressMetrics, Depends(_metrics)]
LedgerDep = Annotated[RequestLedger, Depends(_ledger)]
PublisherDep = Annotated[Publisher, Depends(_publisher)]
ListenerDep = Annotated[ResponseListener, Depends(_listener)]
HubDep = Annotated[ChunkHub, Depends(chunk_hub)]
