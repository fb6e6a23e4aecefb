"""Child processes for development tooling and tests, started and stopped one way.

A child writes to its own log file, dies with the process that started it (``PR_SET_PDEATHSIG``,
so a killed test run or bench leaves nothing behind), runs in its own process group (Ctrl-C
reaches only its parent), may be pinned to CPUs, and is stopped with SIGTERM, then SIGKILL after a
grace period. :class:`WorkerProcess` is ``llmstream worker`` as such
a child, configured by :func:`worker_env` for one set of topics, consumer group and Redis key
prefix (see :func:`scoped_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from llmstream.core.errors import LLMStreamError
from llmstream.core.settings import ServiceSettings

_PR_SET_PDEATHSIG = 1
# Kafka's minimum session timeout; Tansu holds a group join for half of it, so a worker that
# joins waits 3 s rather than the default 15 s.
SESSION_TIMEOUT_S = 6


class ServiceStartError(LLMStreamError):
    """A child process (an embedded broker, Redis, a worker, ...) did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a conventional port, say) right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pin_process(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of a running process (affinity is per thread on Linux)."""
    if cpus is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        # Between fork and exec: the kernel sends SIGTERM when the parent dies, however it dies;
        # and pinning before any thread exists makes every thread the child starts inherit it.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


@dataclass
class ChildProcess:
    """A child process with its own log file, dying with its parent."""

    name: str
    args: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cpus: frozenset[int] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own binaries and arguments
                self.args,
                env=None if self.env is None else dict(self.env),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(self.cpus),
                # Its own process group: Ctrl-C in a terminal reaches only the parent, which
                # stops its children in order (the worker drains on SIGTERM; a SIGINT from the
                # terminal would hit every child at once, mid-shutdown).
                process_group=0,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def _not_up(self, why: str) -> ServiceStartError:
        return ServiceStartError(f"{self.name} {why}; log {self.log_path}:\n{self.log_tail()}")

    def wait_for_port(self, port: int, timeout: float = 15.0) -> None:
        """Block until the child listens on ``port``; stop it and raise if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited:
                raise self._not_up("exited at start")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise self._not_up(f"did not listen on 127.0.0.1:{port} within {timeout:.0f} s")

    async def wait_http(self, url: str, within_s: float = 60.0) -> None:
        """Poll ``url`` until it answers 200; raise if the child exits or time runs out."""
        deadline = time.monotonic() + within_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.exited:
                    raise self._not_up("exited at start")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise self._not_up(f"did not answer 200 at {url} within {within_s:.0f} s")

    def stop(self, grace: float = 10.0) -> bool:
        """SIGTERM; SIGKILL if it is still running ``grace`` seconds later. False if killed."""
        if self.process is None or self.process.poll() is not None:
            return True
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a crash or an OOM kill; then reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# --- the worker as a child process -----------------------------------------------------------


def scoped_settings(
    bootstrap: str,
    redis_url: str,
    name: str,
    *,
    idempotent_producer: bool,
    key_prefix: str | None = None,
) -> ServiceSettings:
    """Settings with topics ``<name>-llm-requests`` etc. and Redis keys under ``<name>:``, so
    runs that share a broker and a Redis cannot see each other's data."""
    return ServiceSettings(
        kafka_bootstrap_servers=bootstrap,
        redis_url=redis_url,
        redis_key_prefix=key_prefix if key_prefix is not None else f"{name}:",
        requests_topic=f"{name}-llm-requests",
        responses_topic=f"{name}-llm-responses",
        metrics_topic=f"{name}-llm-metrics",
        errors_topic=f"{name}-llm-errors",
        chunks_topic=f"{name}-llm-response-chunks",
        kafka_idempotent_producer=idempotent_producer,
    )


def topic_names(settings: ServiceSettings) -> list[str]:
    """The five topics of ``settings``: requests, responses, metrics, errors, chunks."""
    return [
        settings.requests_topic,
        settings.responses_topic,
        settings.metrics_topic,
        settings.errors_topic,
        settings.chunks_topic,
    ]


# A developer's shell must not configure the workers a test or benchmark starts.
_PROVIDER_AND_OWN_VARIABLES = ("LLMSTREAM_", "OPENAI_", "ANTHROPIC_", "OPENROUTER_", "OLLAMA_HOST")


def worker_env(
    settings: ServiceSettings,
    simulator_url: str,
    group: str | None,
    *,
    anthropic_url: str | None = None,
    quick_handover: bool = True,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of ``llmstream worker`` on ``settings``' services, topics and key prefix,
    in consumer group ``group`` (None: the worker's default), calling the provider simulator at
    ``simulator_url`` (and ``anthropic_url`` for Anthropic models, when given).

    This shell's own ``LLMSTREAM_*`` and provider variables (``OPENAI_*``, ``ANTHROPIC_*``,
    ``OPENROUTER_*``, ``OLLAMA_HOST``) are left out, so they cannot point a worker at a real
    provider. ``quick_handover`` commits every 0.5 s and lets
    another worker take over a dead one's requests after 3 s, for runs that stop or kill
    workers; without it the worker keeps its defaults (the bench measures those). ``extra`` wins.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PROVIDER_AND_OWN_VARIABLES)}
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        REDIS_URL=settings.redis_url,
        LLMSTREAM_REDIS_KEY_PREFIX=settings.redis_key_prefix,
        LLMSTREAM_REQUESTS_TOPIC=settings.requests_topic,
        LLMSTREAM_RESPONSES_TOPIC=settings.responses_topic,
        LLMSTREAM_METRICS_TOPIC=settings.metrics_topic,
        LLMSTREAM_ERRORS_TOPIC=settings.errors_topic,
        LLMSTREAM_CHUNKS_TOPIC=settings.chunks_topic,
        # The embedded Tansu broker cannot grant producer IDs, so the idempotent producer is off
        # against it; Apache Kafka keeps it on.
        LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER=str(settings.kafka_idempotent_producer).lower(),
        LLMSTREAM_SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_S),
        LLMSTREAM_HEARTBEAT_INTERVAL_S="1",
        LLMSTREAM_HTTP_HOST="127.0.0.1",
        OPENAI_BASE_URL=f"{simulator_url}/v1",
        OPENAI_API_KEY="sk-simulator-not-a-real-key",
        ANTHROPIC_BASE_URL=anthropic_url or simulator_url,
        ANTHROPIC_API_KEY="sk-ant-simulator-not-a-real-key",
    )
    if group is not None:
        env["LLMSTREAM_CONSUMER_GROUP"] = group
    if quick_handover:
        env.update(LLMSTREAM_COMMIT_INTERVAL_S="0.5", LLMSTREAM_LEASE_MS="3000")
    env.update(extra or {})
    return env


@dataclass
class WorkerProcess:
    """``llmstream worker`` as a child process; ready once its consumer joined the group."""

    env: Mapping[str, str]
    log_dir: Path
    name: str = "worker"
    port: int = field(default_factory=free_port)
    cpus: frozenset[int] | None = None
    managed: ChildProcess | None = None

    def start(self) -> WorkerProcess:
        """Start the process and wait until its HTTP server listens (not yet ready)."""
        self.managed = ChildProcess(
            self.name,
            [sys.executable, "-m", "llmstream.cli", "worker"],
            self.log_dir / f"{self.name}-{self.port}.log",
            {**self.env, "LLMSTREAM_HTTP_PORT": str(self.port)},
            cpus=self.cpus,
            cwd=self.log_dir,
        ).start()
        self.managed.wait_for_port(self.port, timeout=60)
        return self

    async def wait_ready(self, within_s: float = 60) -> None:
        """Until ``/ready`` answers 200: the consumer joined its group."""
        await self.child.wait_http(self.url("/ready"), within_s)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def child(self) -> ChildProcess:
        assert self.managed is not None, f"{self.name} was not started"
        return self.managed

    @property
    def pid(self) -> int:
        return self.child.pid

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no commit, no goodbye; as a crash or an OOM kill."""
        self.child.kill()

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop(grace=40)
