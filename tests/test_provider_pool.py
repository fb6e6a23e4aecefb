"""The connection pool of the non-streamed provider calls, against a raw HTTP server on loopback.

The adapters' behaviour over the pool (answers, statuses, timeouts, cut-off and unusable
answers, what is sent) is tested in test_providers.py, over both transports. Here is what is the
pool's own: connections kept alive and reused, the limit, every way an answer's body can be
framed, interim answers, encoded bodies, TLS, and a call cancelled half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.providers.pool import ConnectionPool, header_map
from tests.loopback import LoopbackServer, Reply
from tests.samples import request


def framed(body: bytes, *extra: str) -> bytes:
    """A 200 answer carrying ``body`` with its Content-Length, and ``extra`` header lines."""
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """``handler`` serving each connection to the port given, on 127.0.0.1. On exit every
    connection is closed and every handler waited for: one left pending until the end of the
    session is destroyed then, and CPython 3.11.2 can fail an unrelated ``ast.parse`` when a
    finalizer runs inside it ("AST constructor recursion depth mismatch")."""
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await server.wait_closed()


class RawServer:
    """Answers each request it reads (up to the end of its body) with ``answer(n)``, n counting
    requests from 0; ``close_after`` closes the connection once that answer is written.
    Counts connections, and the most open at once."""

    def __init__(self, answer: Callable[[int], bytes], *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.hold = asyncio.Event()  # set: answers wait until it is cleared
        self._serving = contextlib.AsyncExitStack()
        self.url = URL()

    async def __aenter__(self) -> RawServer:
        port = await self._serving.enter_async_context(serving(self._serve))
        self.url = URL(f"http://127.0.0.1:{port}/v1/chat/completions")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._serving.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                while self.hold.is_set():
                    await asyncio.sleep(0.01)
                writer.write(self.answer(len(self.requests) - 1))
                await writer.drain()
                if self.close_after:
                    break
        finally:
            self.open -= 1


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    connections = ConnectionPool(limit=10, connect_timeout_s=5, read_timeout_s=5)
    yield connections
    await connections.close()


async def test_calls_in_turn_reuse_one_connection(pool: ConnectionPool) -> None:
    async with RawServer(lambda _: framed(b'{"n": 1}')) as server:
        for _ in range(5):
            status, headers, body = await pool.post(server.url, {"x-a": "1"}, b"{}")
            length = header_map(headers)["content-length"]
            assert (status, length, body) == (200, "8", b'{"n": 1}')

    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.url.port}\r\n" in first
    assert "User-Agent: llmstream/" in first
    assert "x-a: 1\r\n" in first and first.endswith("\r\n\r\n{}")


async def test_a_connection_the_server_closes_is_not_reused(pool: ConnectionPool) -> None:
    closing = framed(b"{}", "Connection: close")
    async with RawServer(lambda _: closing, close_after=True) as server:
        for _ in range(3):
            status, _, _ = await pool.post(server.url, {}, b"{}")
            assert status == 200

    assert server.connections == 3


async def test_an_idle_connection_closed_by_the_server_is_replaced(pool: ConnectionPool) -> None:
    # Keep-alive as far as the headers say, but the server closes right after answering.
    async with RawServer(lambda _: framed(b"{}"), close_after=True) as server:
        for _ in range(3):
            assert (await pool.post(server.url, {}, b"{}"))[0] == 200
            await asyncio.sleep(0.05)  # the close arrives while the connection is idle

    assert server.connections == 3


async def test_no_more_connections_than_the_limit() -> None:
    limited = ConnectionPool(limit=2, connect_timeout_s=5, read_timeout_s=5)
    try:
        async with RawServer(lambda _: framed(b"{}")) as server:

            async def call() -> int:
                await asyncio.sleep(0)
                return (await limited.post(server.url, {}, b"{}"))[0]

            server.hold.set()
            calls = [asyncio.create_task(call()) for _ in range(8)]
            await asyncio.sleep(0.2)
            server.hold.clear()
            assert await asyncio.gather(*calls) == [200] * 8
    finally:
        await limited.close()

    assert server.most_open == 2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"hello world",
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + framed(b"after the interim"), b"after the interim"),
        (framed(gzip.compress(b"zipped"), "Content-Encoding: gzip"), b"zipped"),
        (framed(zlib.compress(b"deflated"), "Content-Encoding: deflate"), b"deflated"),
        (framed(b"", "X-Empty: yes"), b""),
    ],
    ids=["chunked", "until-eof", "interim-100", "gzip", "deflate", "empty"],
)
async def test_every_framing_of_an_answer_is_read(
    pool: ConnectionPool, answer: bytes, expected: bytes
) -> None:
    close = b"Connection: close" in answer
    async with RawServer(lambda _: answer, close_after=close) as server:
        status, _, body = await pool.post(server.url, {}, b"{}")

    assert (status, body) == (200, expected)
    assert b"Accept-Encoding: identity" in server.requests[0]


async def test_a_line_break_in_a_header_value_is_refused_before_sending(
    pool: ConnectionPool,
) -> None:
    async with RawServer(lambda _: framed(b"{}")) as server:
        with pytest.raises(ValueError, match="line break"):
            await pool.post(server.url, {"x-request-id": "a\r\nx-injected: 1"}, b"{}")

    assert server.requests == []


async def test_a_cancelled_call_frees_its_connection() -> None:
    single = ConnectionPool(limit=1, connect_timeout_s=2, read_timeout_s=60)
    try:
        async with RawServer(lambda _: framed(b"{}")) as server:
            server.hold.set()
            call = asyncio.create_task(single.post(server.url, {}, b"{}"))
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            server.hold.clear()
            assert (await single.post(server.url, {}, b"{}"))[0] == 200
    finally:
        await single.close()

    assert server.connections == 2  # the cancelled call's connection was not reused


async def test_an_answer_that_ends_early_is_a_payload_error(pool: ConnectionPool) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    async with RawServer(lambda _: cut, close_after=True) as server:
        with pytest.raises(aiohttp.ClientPayloadError):
            await pool.post(server.url, {}, b"{}")


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with openssl) and its key."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(framed(b'{"secure": true}'))
    await writer.drain()


async def test_tls_with_a_trusted_certificate(certificate: tuple[Path, Path]) -> None:
    trusted = ssl.create_default_context(cafile=str(certificate[0]))
    secure = ConnectionPool(limit=2, connect_timeout_s=5, read_timeout_s=5, ssl_context=trusted)
    async with serving(answer_once, tls_context(certificate)) as port:
        try:
            url = URL(f"https://127.0.0.1:{port}/v1/chat/completions")
            status, _, body = await secure.post(url, {}, b"{}")
        finally:
            await secure.close()

    assert (status, body) == (200, b'{"secure": true}')


async def test_tls_refuses_a_certificate_it_cannot_verify(
    pool: ConnectionPool, certificate: tuple[Path, Path]
) -> None:
    async with serving(answer_once, tls_context(certificate)) as port:
        url = URL(f"https://127.0.0.1:{port}/v1/chat/completions")
        with pytest.raises(aiohttp.ClientConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.post(url, {}, b"{}")


# --- which transport an adapter takes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("trust_env", "credentials", "agent"),
    [(False, "", "llmstream/"), (True, "", "aiohttp/"), (False, "user:pw@", "aiohttp/")],
    ids=["pool", "proxy-from-the-environment", "credentials-in-the-url"],
)
async def test_aiohttp_takes_the_calls_the_pool_cannot_make(
    pool: ConnectionPool, trust_env: bool, credentials: str, agent: str
) -> None:
    reply = Reply.json({"choices": [{"message": {"content": "hi"}}]})
    async with (
        aiohttp.ClientSession(trust_env=trust_env) as client,
        LoopbackServer(reply) as server,
    ):
        url = server.url.replace("http://", f"http://{credentials}")
        adapter = OpenAICompatible("p", client, f"{url}/v1", pool=pool)
        completion = await adapter.complete(request("transport-1"), "m")

    assert completion.content == "hi"
    [sent] = server.received
    assert agent in sent.headers["user-agent"]
    assert ("authorization" in sent.headers) == bool(credentials)  # aiohttp's Basic auth


async def test_the_read_timeout_bounds_each_wait_not_the_whole_answer() -> None:
    # Six pieces 0.2 s apart (1.2 s in all) under a 0.5 s read timeout: read whole. Then a
    # server that goes quiet after its headers: timed out.
    pieces = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"a", b"b", b"c", b"d", b"e"]

    def drip(count: int) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            for piece in pieces[:count]:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.2)
            await reader.read()  # until the client closes

        return handler

    timed = ConnectionPool(limit=2, connect_timeout_s=5, read_timeout_s=0.5)
    async with serving(drip(len(pieces))) as slow, serving(drip(1)) as quiet:
        try:
            _, _, body = await timed.post(URL(f"http://127.0.0.1:{slow}/"), {}, b"{}")
            assert body == b"abcde"
            with pytest.raises(TimeoutError):
                await timed.post(URL(f"http://127.0.0.1:{quiet}/"), {}, b"{}")
        finally:
            await timed.close()


async def test_a_host_name_is_resolved_and_reached(pool: ConnectionPool) -> None:
    # "localhost" may resolve to ::1 first, where nothing listens: the next address is tried.
    async with RawServer(lambda _: framed(b"{}")) as server:
        status, _, _ = await pool.post(server.url.with_host("localhost"), {}, b"{}")

    assert status == 200
    assert f"Host: localhost:{server.url.port}\r\n" in server.requests[0].decode()
