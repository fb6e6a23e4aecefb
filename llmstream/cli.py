"""The ``llmstream`` command: ``worker``, ``ingress``, ``simulate``, ``replay``, ``healthcheck``,
``dev``, ``bench``, ``recover-redis``."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from llmstream import __version__
from llmstream.core.errors import LLMStreamError


def _worker(args: argparse.Namespace) -> int:
    from llmstream.core.connections import negotiate_idempotence
    from llmstream.processors.retention import check_retention
    from llmstream.processors.settings import WorkerSettings
    from llmstream.processors.worker import Worker

    async def prepare(settings: WorkerSettings) -> WorkerSettings:
        await check_retention(settings)  # refuses a TTL that dedup cannot keep its promise with
        return await negotiate_idempotence(settings)

    settings = asyncio.run(prepare(WorkerSettings()))
    loop_factory = None
    if importlib.util.find_spec("uvloop") is not None:
        # libuv's loop: less CPU per request than asyncio's own (measured with `llmstream bench`).
        import uvloop

        loop_factory = uvloop.new_event_loop
    Worker(settings).run(loop_factory)
    return 0


def _recover_redis(args: argparse.Namespace) -> int:
    from llmstream.core.connections import redis_client
    from llmstream.core.record import DeploymentEpoch
    from llmstream.core.settings import ServiceSettings, redact_url

    settings = ServiceSettings()
    where = f"Redis at {redact_url(settings.redis_url)} (keys under {settings.redis_key_prefix!r})"

    async def recover() -> int:
        redis = redis_client(settings)
        try:
            epoch = DeploymentEpoch(redis, key_prefix=settings.redis_key_prefix)
            current = await epoch.read()
            if current is not None:
                print(f"{where} holds its deployment epoch {current}: nothing to recover")
                return 0
            if not args.accept_loss:
                print(
                    f"{where} holds no deployment epoch: it lost its state (or no worker has "
                    "started yet). Workers whose consumer group has committed offsets claim "
                    "nothing until you decide. Requests whose records were lost are called again "
                    "if their events are read again; to accept that and resume, run "
                    "`llmstream recover-redis --accept-loss`"
                )
                return 1
            created = await epoch.create()
        finally:
            await redis.aclose()
        print(
            f"{where}: deployment epoch {created} written; paused workers resume claiming within "
            "LLMSTREAM_REDIS_CHECK_INTERVAL_S"
        )
        return 0

    return asyncio.run(recover())


def _simulate(args: argparse.Namespace) -> int:
    from llmstream.devtools.simulator import SimulatorSettings, serve_simulator

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("latency_ms", args.latency_ms),
            ("error_rate", args.error_rate),
            ("rpm_limit", args.rpm_limit),
            ("stream_chunks", args.stream_chunks),
            ("stream_chunk_delay_ms", args.stream_chunk_delay_ms),
            ("stream_break_rate", args.stream_break_rate),
            ("batch_delay_ms", args.batch_delay_ms),
            ("batch_expire_rate", args.batch_expire_rate),
            ("flex_busy_rate", args.flex_busy_rate),
        )
        if value is not None
    }
    asyncio.run(serve_simulator(SimulatorSettings(**overrides)))
    return 0


def _ingress(args: argparse.Namespace) -> int:
    from llmstream.ingress.app import serve
    from llmstream.ingress.settings import IngressSettings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(IngressSettings(**overrides))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError
    from redis.exceptions import RedisError

    from llmstream.core.settings import ServiceSettings
    from llmstream.replay import ReplayError, replay, selection_from

    try:
        selection = selection_from(
            error_types=args.error_type,
            request_ids=args.ids,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
        asyncio.run(
            replay(
                ServiceSettings(),
                selection,
                dry_run=args.dry_run,
                clear_deadline=args.clear_deadline,
                include_expired=args.include_expired,
            )
        )
    except ReplayError as exc:
        print(f"llmstream replay: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, RedisError, OSError) as exc:
        # What was published before the failure is listed above; running again is safe.
        print(f"llmstream replay: {exc!r}", file=sys.stderr)
        return 1
    return 0


# The services' default ports; a deployment that changes them passes its URLs.
_HEALTH_URLS = (
    "http://127.0.0.1:9100/health",  # worker
    "http://127.0.0.1:8080/health",  # ingress
    "http://127.0.0.1:8090/_sim/stats",  # simulator
)


def _healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the service in this container answers its health URL with 200.

    Standard library only: a container runs this every few seconds.
    """
    import urllib.error
    import urllib.request

    urls = args.url or list(_HEALTH_URLS)
    for url in urls:
        if not url.startswith(("http://", "https://")):
            print(f"not an http(s) URL: {url}", file=sys.stderr)
            return 2
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            continue  # nothing listens there: another kind of service
        print(f"{url}: {status}")
        return 0 if status == 200 else 1
    print(f"nothing answers at {', '.join(urls)}", file=sys.stderr)
    return 1


def _bench(args: argparse.Namespace) -> int:
    from llmstream.devtools.bench import bench_options, run_bench

    return run_bench(bench_options(args))


def _bench_traffic(args: argparse.Namespace) -> int:
    from llmstream.devtools.traffic_bench import SCENARIOS, run_traffic_bench

    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    if not set(scenarios) <= set(SCENARIOS):
        raise SystemExit(f"--scenarios: choose from {','.join(SCENARIOS)}, got {args.scenarios!r}")
    return run_traffic_bench(scenarios, scale=args.scale, requests=args.requests)


def _dev(args: argparse.Namespace) -> int:
    from llmstream.devtools.dev import run_dev

    return run_dev(requests=args.requests, partitions=args.partitions)


class _Parser(argparse.ArgumentParser):
    """A parser whose help ends with the environment variables its command reads.

    They are listed only when help is asked for: importing every settings class on each run
    would slow `llmstream healthcheck`, which a container runs every few seconds.
    """

    environment: Callable[[], str] | None = None

    def format_help(self) -> str:
        text = super().format_help()
        if self.environment is None:
            return text
        return f"{text}\nenvironment variables (default):\n{self.environment()}\n"


def _worker_environment() -> str:
    from llmstream.core.settings import environment_help
    from llmstream.processors.providers.settings import ProviderSettings
    from llmstream.processors.settings import WorkerSettings

    return environment_help(WorkerSettings, ProviderSettings)


def _ingress_environment() -> str:
    from llmstream.core.settings import environment_help
    from llmstream.ingress.settings import IngressSettings

    return environment_help(IngressSettings)


def _replay_environment() -> str:
    from llmstream.core.settings import ServiceSettings, environment_help

    return environment_help(ServiceSettings)


def _simulate_environment() -> str:
    from llmstream.core.settings import environment_help
    from llmstream.devtools.simulator import SimulatorSettings

    return environment_help(SimulatorSettings)


# What each command runs.
_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": _worker,
    "simulate": _simulate,
    "ingress": _ingress,
    "replay": _replay,
    "recover-redis": _recover_redis,
    "healthcheck": _healthcheck,
    "bench": _bench,
    "bench-traffic": _bench_traffic,
    "dev": _dev,
}

# The environment variables each command's help lists.
_ENVIRONMENT: dict[str, Callable[[], str]] = {
    "worker": _worker_environment,
    "ingress": _ingress_environment,
    "replay": _replay_environment,
    "recover-redis": _replay_environment,
    "simulate": _simulate_environment,
}


# The commands that connect to the services: they take the addresses of a running `make run`
# from its stack file (see llmstream.core.settings.apply_stack_file).
_USES_STACK_FILE = {"worker", "ingress", "replay", "recover-redis"}


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="llmstream", description="Kafka-native processor for LLM requests.")
    parser.add_argument("--version", action="version", version=f"llmstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "worker", help="consume llm-requests and emit responses, metrics and errors"
    )

    simulate = commands.add_parser("simulate", help="run the provider simulator (OpenAI/Anthropic)")
    simulate.add_argument("--host", help="listen address (LLMSTREAM_SIM_HOST, default 127.0.0.1)")
    simulate.add_argument("--port", type=int, help="listen port (LLMSTREAM_SIM_PORT, default 8090)")
    simulate.add_argument("--latency-ms", type=float)
    simulate.add_argument("--error-rate", type=float)
    simulate.add_argument("--rpm-limit", type=int)
    simulate.add_argument(
        "--stream-chunks",
        type=int,
        help="pieces a streamed answer comes in (LLMSTREAM_SIM_STREAM_CHUNKS, default 8)",
    )
    simulate.add_argument(
        "--stream-chunk-delay-ms",
        type=float,
        help="wait between two pieces (LLMSTREAM_SIM_STREAM_CHUNK_DELAY_MS, default 20)",
    )
    simulate.add_argument(
        "--stream-break-rate",
        type=float,
        help="share of streams cut half-way (LLMSTREAM_SIM_STREAM_BREAK_RATE, default 0)",
    )
    simulate.add_argument(
        "--batch-delay-ms",
        type=float,
        help="how long a batch takes to finish (LLMSTREAM_SIM_BATCH_DELAY_MS, default 2000)",
    )
    simulate.add_argument(
        "--batch-expire-rate",
        type=float,
        help="share of batches that expire whole (LLMSTREAM_SIM_BATCH_EXPIRE_RATE, default 0)",
    )
    simulate.add_argument(
        "--flex-busy-rate",
        type=float,
        help="share of flex calls answered 429 (LLMSTREAM_SIM_FLEX_BUSY_RATE, default 0)",
    )

    ingress = commands.add_parser(
        "ingress", help="HTTP API (and OpenAI-compatible front) that publishes to llm-requests"
    )
    ingress.add_argument("--host", help="listen address (LLMSTREAM_HOST, default 0.0.0.0)")
    ingress.add_argument("--port", type=int, help="listen port (LLMSTREAM_PORT, default 8080)")

    replay = commands.add_parser(
        "replay", help="publish the requests of selected llm-errors events to llm-requests again"
    )
    replay.add_argument(
        "--error-type", action="append", default=[], metavar="TYPE", help="repeatable"
    )
    replay.add_argument(
        "--id", dest="ids", action="append", default=[], metavar="REQUEST_ID", help="repeatable"
    )
    replay.add_argument("--since", help="errors at or after: ISO 8601 (UTC if no offset) or ms")
    replay.add_argument("--until", help="errors before: ISO 8601 (UTC if no offset) or ms")
    replay.add_argument("--limit", type=int, help="at most this many requests, oldest first")
    replay.add_argument("--dry-run", action="store_true", help="list them; change nothing")
    replay.add_argument(
        "--clear-deadline", action="store_true", help="drop deadline_ms (to replay 'expired')"
    )
    replay.add_argument(
        "--include-expired",
        action="store_true",
        help="also replay requests whose record expired (it may have succeeded since)",
    )

    recover_redis = commands.add_parser(
        "recover-redis",
        help="after Redis lost its state: let paused workers claim again (docs/operations.md)",
    )
    recover_redis.add_argument(
        "--accept-loss",
        action="store_true",
        help="accept that requests whose records were lost are called again if read again",
    )

    healthcheck = commands.add_parser(
        "healthcheck", help="exit 0 when this container's worker, ingress or simulator is alive"
    )
    healthcheck.add_argument("url", nargs="*", help="default: each service's health URL")
    healthcheck.add_argument("--timeout", type=float, default=3.0)

    bench = commands.add_parser(
        "bench", help="measure throughput per core, CPU per request and overhead (make bench)"
    )
    bench.add_argument("--requests", type=int, help="requests per scenario (default 30000)")
    bench.add_argument("--latency-ms", type=float, help="simulated provider latency (200)")
    bench.add_argument("--in-flight", type=int, help="in flight, worker and bare loop (500)")
    bench.add_argument("--steady-seconds", type=float, help="scenario 3's duration (60)")
    bench.add_argument("--scenarios", help="comma-separated, of 1,2,3,4,5 (default all)")
    bench.add_argument("--partitions", type=int, help="partitions of the requests topic (4)")
    bench.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    bench.add_argument(
        "--quick", action="store_true", help="a smoke run: 5000 requests, 15 s of steady load"
    )

    bench_traffic = commands.add_parser(
        "bench-traffic",
        help="traffic control end to end: goodput at a rate limit, adaptation, circuit breaking",
    )
    bench_traffic.add_argument(
        "--scenarios", help="comma-separated, of goodput,adaptive,circuit (default all)"
    )
    bench_traffic.add_argument(
        "--requests", type=int, default=3000, help="queued requests (goodput, adaptive)"
    )
    bench_traffic.add_argument(
        "--scale", type=float, default=1.0, help="time scale: 10 runs ten times faster (1)"
    )

    dev = commands.add_parser(
        "dev", help="start broker, Redis, simulator and a worker, and show requests flowing"
    )
    dev.add_argument("--requests", type=int, default=5, help="sample requests to produce")
    dev.add_argument("--partitions", type=int, default=4)

    for name, command in commands.choices.items():
        command.environment = _ENVIRONMENT.get(name)

    args = parser.parse_args(argv)
    if args.command in _USES_STACK_FILE:
        from llmstream.core.settings import apply_stack_file

        notice = apply_stack_file()
        if notice:
            print(f"llmstream {args.command}: {notice}", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return _RUN[args.command](args)
    except LLMStreamError as exc:
        # A setup the command cannot run with (a broker refusing what the settings insist on, a
        # service that did not start): one line that says what to change, not a traceback.
        print(f"llmstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        # Settings read from the environment: name each variable, never echo its value.
        from llmstream.core.settings import describe_invalid_settings

        print(f"llmstream {args.command}: {describe_invalid_settings(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
