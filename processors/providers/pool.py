"""Keep-alive HTTP/1.1 connections for the non-streamed provider calls: the per-request path.

A call is one ``POST`` of a JSON body whose answer is read whole. Through aiohttp's client an
adapter's call cost 175 to 280 µs of CPU here on CPython 3.11 (its session, request and response
objects, a task to write each body, stream readers); this pool writes the request line and
headers itself and reads the answer with httptools' parser (llhttp, the parser of Node.js and
uvicorn) into one buffer, and the same call costs 98 to 123 µs (``python -m tests.http_cpu``).
Streamed calls, calls through a proxy and URLs with credentials still go through aiohttp
(:mod:`.http`).

What it does, as aiohttp's client does it:

- Connections per origin (scheme, host, port) are reused while the server keeps them alive; one
  idle longer than ``idle_s``, or closed by the server, is dropped. At most ``limit`` are open
  over all origins; a call beyond that waits for a free one, at most ``connect_timeout_s``, then
  raises :class:`TimeoutError`; so does connecting for longer.
- Connecting by Happy Eyeballs (``aiohappyeyeballs``, aiohttp's own), 250 ms between attempts;
  TLS with the system's certificates and the host's name checked (``ssl.create_default_context``).
- Bodies by Content-Length, chunked, or until the server closes; ``1xx`` answers are skipped;
  ``gzip`` and ``deflate`` bodies are decoded (``identity`` is asked for).
- Each wait for bytes from the server is bounded by ``read_timeout_s`` (:class:`TimeoutError`).

Failures are aiohttp's exception types, so the adapters classify both transports alike: a
connection refused or reset is a ``ClientConnectionError``, one closed before the answer's end
a ``ServerDisconnectedError`` or ``ClientPayloadError``, bytes that are not HTTP a plain
``ClientError``. A header value holding CR or LF raises ``ValueError`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from typing import cast

import aiohappyeyeballs
import aiohttp
import httptools
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from llmstream import __version__

__all__ = ["ConnectionPool", "RawAnswer", "header_map"]

# An answer's status, its headers as they came (names and values in bytes), its decoded body.
RawAnswer = tuple[int, list[tuple[bytes, bytes]], bytes]
_Origin = tuple[str, str, int]  # scheme, host, port

_USER_AGENT = f"llmstream/{__version__}"
# zlib's window bits that accept a gzip or a zlib header, and raw deflate.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Connection(asyncio.Protocol):
    """One connection: writes a request, parses its answer, resolves the call's future."""

    def __init__(self, pool: ConnectionPool, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.made = False  # connected: from here on connection_lost frees its place in the pool
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[RawAnswer] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._status = 0
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the end is not the connection's end
        self._encoding = b""  # Content-Encoding
        self._reusable = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_bytes = 0.0  # when the server last sent some

    # -- the call -----------------------------------------------------------------------------

    def request(self, head: bytes, body: bytes) -> asyncio.Future[RawAnswer]:
        assert self.transport is not None
        loop = self.pool.loop
        self._answer = answer = loop.create_future()
        self._headers, self._body, self._headers_done, self._reusable = [], [], False, False
        self.transport.write(head + body)
        self._last_bytes = loop.time()
        self._timer = loop.call_later(self.pool.read_timeout_s, self._check_timeout)
        return answer

    def _check_timeout(self) -> None:
        # One timer per call, moved on when it fires rather than each time bytes arrive.
        timeout = self.pool.read_timeout_s
        left = self._last_bytes + timeout - self.pool.loop.time()
        if left > 0:
            self._timer = self.pool.loop.call_later(left, self._check_timeout)
            return
        self._fail(TimeoutError(f"no bytes from the server for {timeout} s"))

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.made = True

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self._last_bytes = self.pool.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientError(f"not a valid HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        self.closed = True  # never handed out again, though connection_lost comes a turn later
        return False  # the transport closes; connection_lost says what that means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool.lost(self)
        if self._answer is None:
            return
        if self._headers_done and not self._framed:
            self.on_message_complete()  # a body delimited by the end of the connection
        elif self._headers_done:
            self._fail(aiohttp.ClientPayloadError("the answer's body ended before its length"))
        else:
            self._fail(aiohttp.ServerDisconnectedError())

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        framed, encoding = False, b""
        for name, value in self._headers:
            name = name.lower()
            if name == b"content-length":
                framed = True
            elif name == b"transfer-encoding":
                framed = framed or b"chunked" in value.lower()
            elif name == b"content-encoding":
                encoding = value.strip().lower()
        self._framed, self._encoding = framed, encoding

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200:  # an interim answer: the real one follows
            self._headers, self._body, self._headers_done = [], [], False
            return
        answer, self._answer = self._answer, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._reusable = self._parser.should_keep_alive()
        if answer is None or answer.done():
            return
        body = b"".join(self._body)
        if self._encoding not in (b"", b"identity"):
            try:
                body = _decoded(body, self._encoding.decode("latin-1"))
            except ContentEncodingError as exc:
                self._reusable = False
                error = aiohttp.ClientPayloadError(str(exc))
                error.__cause__ = exc  # how the adapters tell it from a connection cut off
                answer.set_exception(error)
                return
        answer.set_result((self._status, self._headers, body))

    @property
    def reusable(self) -> bool:
        return self._reusable and not self.closed


def header_map(headers: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    """An answer's headers as aiohttp gives them: made only when they are read (an error)."""
    return CIMultiDictProxy(
        CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in headers
        )
    )


def _decoded(body: bytes, encoding: str) -> bytes:
    wbits = _DECODERS.get(encoding)
    if wbits is None:
        raise ContentEncodingError(f"cannot decode Content-Encoding {encoding!r}")
    try:
        if encoding == "deflate" and body[:1] != b"\x78":  # raw deflate, without zlib's header
            wbits = -zlib.MAX_WBITS
        decoder = zlib.decompressobj(wbits)
        return decoder.decompress(body) + decoder.flush()
    except zlib.error as exc:
        raise ContentEncodingError(f"cannot decode the {encoding} body: {exc}") from None


class ConnectionPool:
    """Keep-alive connections shared by every adapter's non-streamed calls (one per worker)."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        idle_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle_s = idle_s
        self._ssl = ssl_context
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def post(self, url: URL, headers: Mapping[str, str], body: bytes) -> RawAnswer:
        """POST ``body`` to ``url`` with ``headers`` and read the answer whole."""
        origin = _origin(url)
        head = _head(url, headers, len(body))
        connection = await self._acquire(origin)
        try:
            answer = await connection.request(head, body)
        except BaseException:
            connection.close()  # cancelled or failed mid-call: its state is unknown
            raise
        self._release(connection)
        return answer

    async def close(self) -> None:
        """Close every connection; calls made after this fail."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("the HTTP client was closed"))

    # -- connections --------------------------------------------------------------------------

    async def _acquire(self, origin: _Origin) -> _Connection:
        if self._closed:
            raise aiohttp.ClientConnectionError("the HTTP client was closed")
        connection = self._idle_connection(origin)
        if connection is not None:
            return connection
        async with asyncio.timeout(self.connect_timeout_s):
            while self._open >= self.limit:
                self._drop_an_idle_connection()  # its place frees once it is closed
                await self._wait()
                connection = self._idle_connection(origin)
                if connection is not None:
                    return connection
            self._open += 1
            connection = _Connection(self, origin)
            try:
                await self._connect(connection)
            except BaseException:
                if connection.made:
                    connection.close()  # cancelled once connected: lost() frees its place
                else:
                    self._open -= 1
                    self._wake()
                raise
            return connection

    def _idle_connection(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = self.loop.time()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            transport = connection.transport
            fresh = now - connection.idle_since <= self._idle_s
            if fresh and not connection.closed and transport and not transport.is_closing():
                return connection
            connection.close()
        return None

    async def _wait(self) -> None:
        """Until a connection is released or closed."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, but leaving: the next waiter takes the place
            else:
                self._forget(waiter)
            raise

    async def _connect(self, connection: _Connection) -> None:
        scheme, host, port = connection.origin
        tls = self._tls() if scheme == "https" else None
        loop = self.loop
        sock: socket.socket | None = None
        try:
            addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            # Happy Eyeballs (RFC 8305), as aiohttp connects: a host whose IPv6 route is broken
            # is reached over IPv4 a quarter of a second later, not after the connect timeout.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=0.25, interleave=1, loop=loop
            )
            await loop.create_connection(
                lambda: connection,
                sock=sock,
                ssl=tls,
                server_hostname=host if tls is not None else None,
            )
        except OSError as exc:  # refused, unreachable, unknown host, TLS refused
            detail = exc.strerror or str(exc) or type(exc).__name__
            raise aiohttp.ClientConnectionError(
                f"cannot connect to {host}:{port}: {detail}"
            ) from exc
        finally:
            if sock is not None and not connection.made:  # the transport never took it
                sock.close()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed:
            connection.idle_since = self.loop.time()
            self._idle.setdefault(connection.origin, deque()).append(connection)
            self._wake()
        else:
            connection.close()  # connection_lost frees its place

    def lost(self, connection: _Connection) -> None:
        """Called once a connection is closed (asyncio calls connection_lost once, and only
        after connection_made): its place is free."""
        self._open -= 1
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        self._wake()

    def _drop_an_idle_connection(self) -> None:
        for idle in self._idle.values():
            if idle:
                idle.popleft().close()  # the least recently used
                return

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already woken and taken off the queue
            self._waiters.remove(waiter)


def _origin(url: URL) -> _Origin:
    scheme, host = url.scheme, url.raw_host  # raw: an international name in its ASCII form
    if scheme not in ("http", "https") or not host:
        raise aiohttp.NonHttpUrlClientError(url)
    return scheme, host, url.port or (443 if scheme == "https" else 80)


def _head(url: URL, headers: Mapping[str, str], length: int) -> bytes:
    lines = [
        f"POST {url.raw_path_qs} HTTP/1.1",
        f"Host: {url.host_port_subcomponent}",
        f"User-Agent: {_USER_AGENT}",
        "Accept-Encoding: identity",
        f"Content-Length: {length}",
        *(f"{name}: {value}" for name, value in headers.items()),
        "",
        "",
    ]
    head = "\r\n".join(lines)
    # Every line break is one of ours: a CR or LF in a value would start a header of its own.
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        raise ValueError("a header value holds a line break (CR or LF)")
    return head.encode()
