"""The ``llmstream`` command: ``worker``, ``ingress``, ``simulate``, ``dev``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def _worker(args: argparse.Namespace) -> int:
    from processors.settings import WorkerSettings
    from processors.worker import Worker

    Worker(WorkerSettings()).run()
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from processors.simulator import SimulatorSettings, serve_simulator

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("latency_ms", args.latency_ms),
            ("error_rate", args.error_rate),
            ("rpm_limit", args.rpm_limit),
        )
        if value is not None
    }
    asyncio.run(serve_simulator(SimulatorSettings(**overrides)))
    return 0


def _ingress(args: argparse.Namespace) -> int:
    from ingress.app import serve
    from ingress.settings import IngressSettings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(IngressSettings(**overrides))
    return 0


def _dev(args: argparse.Namespace) -> int:
    from llmstream.dev import run_dev

    return run_dev(requests=args.requests, partitions=args.partitions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmstream", description="Kafka-native processor for LLM requests."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser(
        "worker", help="consume llm-requests and emit responses, metrics and errors"
    )
    worker.set_defaults(func=_worker)

    simulate = commands.add_parser("simulate", help="run the provider simulator (OpenAI/Anthropic)")
    simulate.add_argument("--host")
    simulate.add_argument("--port", type=int)
    simulate.add_argument("--latency-ms", type=float)
    simulate.add_argument("--error-rate", type=float)
    simulate.add_argument("--rpm-limit", type=int)
    simulate.set_defaults(func=_simulate)

    ingress = commands.add_parser(
        "ingress", help="HTTP API (and OpenAI-compatible front) that publishes to llm-requests"
    )
    ingress.add_argument("--host")
    ingress.add_argument("--port", type=int)
    ingress.set_defaults(func=_ingress)

    dev = commands.add_parser(
        "dev", help="start broker, Redis, simulator and a worker, and show requests flowing"
    )
    dev.add_argument("--requests", type=int, default=5, help="sample requests to produce")
    dev.add_argument("--partitions", type=int, default=4)
    dev.set_defaults(func=_dev)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
