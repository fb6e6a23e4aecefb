"""``llmstream bench``: throughput per core, CPU per request and overhead, against the bare loop.

Everything runs as separate processes on this machine: the broker and Redis (embedded, or those
named by ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL``), the provider simulator, and each worker as
``python -m llmstream.cli worker``. Where the OS allows, the worker (and the bare loop) run pinned
to the first CPU and everything else to the others, so "one core" means one core.

The modules: :mod:`.options` (what to run), :mod:`.rig` (the shared services and the workers),
:mod:`.scenarios` (what each scenario does), :mod:`.measure` (reading topics, /metrics and the
arithmetic), :mod:`.cpu` (placement and CPU accounting from /proc), :mod:`.report` (the table),
and ``__main__`` (the bare loop, run as ``python -m llmstream.devtools.bench bare-loop ...``).
How each figure is measured is printed in the table itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from llmstream.devtools.bench.cpu import machine
from llmstream.devtools.bench.measure import Figures, arrival_bursts, histogram_quantile, percentile
from llmstream.devtools.bench.options import ALL_SCENARIOS, BenchOptions, bench_options
from llmstream.devtools.bench.report import build_table, render_report
from llmstream.devtools.bench.rig import open_rig, say
from llmstream.devtools.bench.scenarios import run_scenarios

__all__ = [
    "ALL_SCENARIOS",
    "BenchOptions",
    "Figures",
    "arrival_bursts",
    "bench_options",
    "build_table",
    "histogram_quantile",
    "percentile",
    "run_bench",
]


def run_bench(options: BenchOptions) -> int:
    """Run the scenarios, print the table, write --json; returns the exit code."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    started = time.monotonic()
    with open_rig(options) as rig:
        say(f"services up (logs in {rig.workdir}); {rig.placement.describe()}")
        results = asyncio.run(run_scenarios(rig))
        broker = (
            "Tansu (embedded)"
            if rig.services.embedded_broker
            else f"{rig.bootstrap} (from KAFKA_BOOTSTRAP_SERVERS)"
        )
        info = {"machine": machine(), "placement": rig.placement.describe(), "broker": broker}
    report = render_report(results, options, info)
    print(report, flush=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    if options.json_path is not None:
        document = {
            "options": {
                **{k: v for k, v in options.__dict__.items() if k != "json_path"},
                "scenarios": list(options.scenarios),
            },
            **info,
            "results": {k: v.values for k, v in results.items()},
            "table": report,
        }
        options.json_path.write_bytes(
            orjson.dumps(
                document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str
            )
        )
        say(f"figures written to {options.json_path}")
    return 0
