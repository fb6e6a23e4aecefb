"""A real HTTP server on 127.0.0.1 for the provider tests: each request is answered with what a
handler replies, and recorded as received.

    async with LoopbackServer(lambda _: Reply.json({"ok": True})) as server:
        ... adapter pointed at server.url ...
    [sent] = server.received  # method, path, query, headers (names lowercased), body

A :class:`Reply` can also wait before answering (a slow provider), stop halfway through its
body and close the connection (a provider that went away mid-answer), or be raw bytes written
to the socket in place of HTTP (a server that does not speak it). Waits end when the server
stops, so a test never waits them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from llmstream.devtools.simulator import AppServer

__all__ = ["Handler", "LoopbackServer", "Received", "Reply"]


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the server read it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the server answers.

    ``delay_s`` is waited before anything is sent. ``cut`` sends the status, the headers (with
    the whole body's Content-Length) and the first half of the body, then closes the connection.
    ``raw``, when set, is written to the socket as it is, instead of an HTTP response, and the
    connection closed.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0
    cut: bool = False
    raw: bytes | None = None

    @classmethod
    def json(
        cls,
        data: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        *,
        delay_s: float = 0.0,
        cut: bool = False,
    ) -> Reply:
        """``data`` as a JSON body."""
        headers = {"content-type": "application/json", **(headers or {})}
        return cls(status, headers, orjson.dumps(data), delay_s=delay_s, cut=cut)


Handler = Callable[[Received], Reply | Awaitable[Reply]]


class LoopbackServer(AppServer):
    """An aiohttp server on 127.0.0.1 and a free port, answering every path and method with
    ``handler``'s reply (or always the same ``Reply``); ``received`` lists the requests in the
    order they arrived."""

    def __init__(self, handler: Handler | Reply) -> None:
        super().__init__(web.Application())
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._handler = handler
        self.received: list[Received] = []
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        self._stopping.set()  # held answers end now
        await super().stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        received = Received(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={name.lower(): value for name, value in request.headers.items()},
            body=await request.read(),
        )
        self.received.append(received)
        if isinstance(self._handler, Reply):
            reply = self._handler
        else:
            answer = self._handler(received)
            reply = await answer if inspect.isawaitable(answer) else answer
        if reply.delay_s:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(reply.delay_s):
                    await self._stopping.wait()
        transport = request.transport
        if reply.raw is not None and transport is not None:
            transport.write(reply.raw)
            transport.close()
            # aiohttp then fails to write a response on the closed connection, and lets it be.
            return web.Response()
        if reply.cut and transport is not None:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.content_length = len(reply.body)
            await response.prepare(request)
            await response.write(reply.body[: len(reply.body) // 2])
            transport.close()  # after the bytes written so far are flushed
            return response
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
