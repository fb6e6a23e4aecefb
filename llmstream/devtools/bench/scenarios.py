"""The scenarios of ``llmstream bench``, each on its own topics, consumer group and key prefix.

1. backlog drain: N requests are on the requests topic before one worker starts;
2. the bare loop: a plain asyncio + aiohttp client making the same N calls with the same number
   in flight, no Kafka, no Redis, no dedup: what one Python core can do at best;
3. steady load at half of scenario 1's throughput: overhead and consumer lag over time;
4. scale-out: two workers in one group drain the same backlog;
5. traffic control: goodput at a provider's rate limit, and adaptation to a limit lower than
   configured, time x10 (``llmstream bench-traffic`` runs them in real time, with the circuit
   breaker's scenario).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from llmstream.devtools.bench.cpu import (
    cpu_busy_seconds,
    cpu_seconds,
    machine_busy_seconds,
    peak_rss_bytes,
)
from llmstream.devtools.bench.measure import (
    Figures,
    Scrape,
    arrival_bursts,
    bucket_delta,
    histogram_quantile,
    mean,
    percentile,
    read_outcomes,
    scrape,
    scrape_all,
    wait_finished,
)
from llmstream.devtools.bench.rig import (
    Rig,
    fill_backlog,
    producer,
    request_event,
    request_ids,
    say,
)
from llmstream.devtools.processes import SESSION_TIMEOUT_S, ChildProcess
from llmstream.devtools.traffic_bench import Rig as TrafficRig
from llmstream.devtools.traffic_bench import run_adaptive, run_goodput


async def drain_backlog(rig: Rig, scenario: str, worker_count: int) -> Figures:
    """Scenarios 1 and 4: N requests wait on the topic; ``worker_count`` workers drain them."""
    options = rig.options
    topics = await rig.new_topics(scenario)
    ids = request_ids(f"{rig.run_id}-{scenario}", options.requests)
    await rig.simulator("POST", "/_sim/reset")
    if worker_count == 1:
        took = await fill_backlog(rig.bootstrap, topics.requests_topic, ids)
        say(f"{scenario}: {len(ids):,} requests on {topics.requests_topic} in {took:.1f} s")
    group = f"bench-{rig.run_id}-{scenario}"
    placement = rig.placement
    cpu_sets = [placement.worker, placement.second_worker][:worker_count]
    workers = await asyncio.gather(
        *(
            rig.start_worker(f"{scenario}-worker-{i + 1}", topics, group, cpus)
            for i, cpus in enumerate(cpu_sets)
        )
    )
    try:
        await asyncio.gather(*(w.wait_ready() for w in workers))
        if worker_count > 1:
            # Workers that join one by one would rebalance in the middle of the drain (on Tansu
            # a join waits half the session timeout): let the group settle, then produce the
            # backlog, which takes well under a second, before the first fetch returns.
            await asyncio.sleep(SESSION_TIMEOUT_S)
        async with aiohttp.ClientSession() as session:
            before = await scrape_all(session, workers)
        cpu_before = [cpu_seconds(w.pid) for w in workers]
        others_before = rig.others_cpu_seconds()
        busy_before = machine_busy_seconds()
        per_cpu_before = cpu_busy_seconds()
        driver_before = time.process_time()
        wall_before = time.perf_counter()
        if worker_count > 1:
            took = await fill_backlog(rig.bootstrap, topics.requests_topic, ids)
            say(f"{scenario}: {len(ids):,} requests on {topics.requests_topic} in {took:.1f} s")
        in_flight = await wait_finished(
            workers, options.requests, within_s=max(300, options.requests / 50)
        )
        wall = time.perf_counter() - wall_before
        cpu = sum(cpu_seconds(w.pid) - c for w, c in zip(workers, cpu_before, strict=True))
        others = rig.others_cpu_seconds() - others_before
        busy = machine_busy_seconds() - busy_before
        per_cpu = {c: b - per_cpu_before.get(c, 0.0) for c, b in cpu_busy_seconds().items()}
        driver = time.process_time() - driver_before
        rss = max(peak_rss_bytes(w.pid) for w in workers)
        async with aiohttp.ClientSession() as session:
            after = await scrape_all(session, workers)
    finally:
        for w in workers:
            w.stop()
    outcomes = await read_outcomes(topics, set(ids))
    calls = await rig.count_calls(set(ids))
    overhead = bucket_delta(after, before)
    window = outcomes.window_s()
    f = Figures()
    f["workers"] = worker_count
    f["requests"] = options.requests
    f["completed"] = outcomes.unique_responses
    f["window_s"] = window
    f["rps"] = outcomes.unique_responses / window
    f["worker_cpu_s"] = cpu
    f["cpu_s_per_1000"] = cpu / options.requests * 1000
    f["worker_busy"] = cpu / wall / worker_count
    f["others_busy"] = others / wall
    # Anything else: other processes, and the kernel's share of loopback networking.
    f["foreign_busy"] = max(0.0, busy - cpu - others - driver) / wall
    f["machine_busy"] = busy / wall
    f["cpu_busy"] = {f"cpu{c}": b / wall for c, b in sorted(per_cpu.items())}
    f["provider_p50_ms"] = percentile(outcomes.timings["latency_ms"], 0.5)
    f["mean_in_flight"] = mean(in_flight)
    f["burst_size"], f["burst_interval_ms"] = arrival_bursts(outcomes.timings["picked_up_ms"])
    f["peak_rss_bytes"] = rss
    for q in (0.5, 0.95, 0.99):
        f[f"overhead_p{round(q * 100)}_ms"] = histogram_quantile(overhead, q) * 1000
    f["e2e_p50_ms"] = percentile(outcomes.timings["e2e_ms"], 0.5)
    f["e2e_p99_ms"] = percentile(outcomes.timings["e2e_ms"], 0.99)
    f["store_p50_ms"] = percentile(outcomes.timings["store_ms"], 0.5)
    f["calls_per_id"] = calls.per_id
    f["ids_called_twice"] = calls.called_twice
    f["lost"] = options.requests - outcomes.unique_outcomes
    f["errors"] = outcomes.errors
    f["duplicate_outputs"] = outcomes.duplicate_outputs
    return f


async def bare_loop(rig: Rig) -> Figures:
    """Scenario 2: the same N calls from a plain asyncio + aiohttp loop, on the worker's core."""
    options = rig.options
    ids = request_ids(f"{rig.run_id}-s2", options.requests)
    await rig.simulator("POST", "/_sim/reset")
    out = rig.workdir / "s2-bare-loop.json"
    args = [sys.executable, "-m", "llmstream.devtools.bench", "bare-loop"]
    args += [f"{rig.simulator_url}/v1/chat/completions", str(options.requests)]
    args += [str(options.in_flight), f"{rig.run_id}-s2", str(out)]
    workdir = rig.workdir / "s2"
    log = workdir / "s2-bare-loop.log"
    child = ChildProcess("s2-bare-loop", args, log, os.environ, rig.placement.worker, workdir)
    process = child.start().process
    assert process is not None
    others_before = rig.others_cpu_seconds()
    returncode = await asyncio.to_thread(process.wait)
    others = rig.others_cpu_seconds() - others_before
    if returncode != 0:
        raise RuntimeError(f"the bare loop failed; log:\n{child.log_tail()}")
    result = json.loads(out.read_text())
    calls = await rig.count_calls(set(ids))
    f = Figures()
    f["requests"] = options.requests
    f["completed"] = result["ok"]
    f["window_s"] = result["wall_s"]
    f["rps"] = result["ok"] / result["wall_s"]
    f["cpu_s_per_1000"] = result["cpu_s"] / options.requests * 1000
    f["busy"] = result["cpu_s"] / result["wall_s"]
    f["others_busy"] = others / result["wall_s"]
    f["peak_rss_bytes"] = result["peak_rss_bytes"]
    f["calls_per_id"] = calls.per_id
    f["failed"] = result["failed"]
    return f


async def steady_load(rig: Rig, rate: float) -> Figures:
    """Scenario 3: ``rate`` requests/s for ``steady_seconds``; overhead and lag over time."""
    options = rig.options
    topics = await rig.new_topics("s3")
    await rig.simulator("POST", "/_sim/reset")
    group = f"bench-{rig.run_id}-s3"
    worker = await rig.start_worker("s3-worker", topics, group, rig.placement.worker)
    produced_end: dict[int, int] = {}
    lag_samples: list[tuple[float, int]] = []
    snapshots: list[tuple[float, Scrape]] = []
    ids: list[str] = []
    # Reads the group's committed offsets (OffsetFetch) without joining the group.
    offsets = AIOKafkaConsumer(
        bootstrap_servers=rig.bootstrap, group_id=group, enable_auto_commit=False
    )
    kafka = producer(rig.bootstrap)
    try:
        await worker.wait_ready()
        await offsets.start()
        tps = [TopicPartition(topics.requests_topic, p) for p in range(options.partitions)]
        offsets.assign(tps)
        await kafka.start()
        session = aiohttp.ClientSession()
        try:
            snapshots.append((0.0, await scrape(session, worker)))
            cpu_before = cpu_seconds(worker.child.pid)
            others_before = rig.others_cpu_seconds()
            pending: list[asyncio.Future[Any]] = []

            def record(future: asyncio.Future[Any]) -> None:
                if not future.cancelled() and future.exception() is None:
                    meta = future.result()
                    produced_end[meta.partition] = max(
                        produced_end.get(meta.partition, 0), meta.offset + 1
                    )

            async def sample_lag(at: float) -> None:
                lag = 0
                for partition, end in produced_end.items():
                    done = await offsets.committed(TopicPartition(topics.requests_topic, partition))
                    lag += max(0, end - (done or 0))
                lag_samples.append((at, lag))

            started = time.perf_counter()
            duration = options.steady_seconds
            next_sample = 1.0
            sent = 0
            while (now := time.perf_counter() - started) < duration:
                due = min(int(now * rate) + 1, int(duration * rate))
                while sent < due:
                    request_id = f"{rig.run_id}-s3-{sent:07d}"
                    key, value = request_event(request_id, f"Tell me one fact about {sent}.")
                    future = await kafka.send(topics.requests_topic, value, key=key)
                    future.add_done_callback(record)
                    pending.append(future)
                    ids.append(request_id)
                    sent += 1
                if now >= next_sample:
                    await sample_lag(now)
                    snapshots.append((now, await scrape(session, worker)))
                    next_sample += 1.0
                await asyncio.sleep(0.005)
            await asyncio.gather(*pending)
            offered_wall = time.perf_counter() - started
            await wait_finished([worker], len(ids), within_s=120)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(worker.child.pid) - cpu_before
            others = rig.others_cpu_seconds() - others_before
            rss = peak_rss_bytes(worker.child.pid)
            final = await scrape(session, worker)
        finally:
            await session.close()
    finally:
        with contextlib.suppress(Exception):
            await kafka.stop()
        with contextlib.suppress(Exception):
            await offsets.stop()
        worker.stop()
    outcomes = await read_outcomes(topics, set(ids))
    calls = await rig.count_calls(set(ids))
    f = Figures()
    f["offered_rps"] = rate
    f["requests"] = len(ids)
    f["achieved_offered_rps"] = len(ids) / offered_wall
    f["completed"] = outcomes.unique_responses
    f["burst_size"], f["burst_interval_ms"] = arrival_bursts(outcomes.timings["picked_up_ms"])
    whole = bucket_delta(final, snapshots[0][1])
    for q in (0.5, 0.95, 0.99):
        f[f"overhead_p{round(q * 100)}_ms"] = histogram_quantile(whole, q) * 1000
    # Thirds of the load window, each from the histogram's change over it.
    thirds = []
    for k in range(3):
        lo, hi = options.steady_seconds * k / 3, options.steady_seconds * (k + 1) / 3
        first = min(snapshots, key=lambda s: abs(s[0] - lo))[1]
        last = min(snapshots, key=lambda s: abs(s[0] - hi))[1]
        delta = bucket_delta(last, first)
        thirds.append(
            {
                "p50_ms": histogram_quantile(delta, 0.5) * 1000,
                "p99_ms": histogram_quantile(delta, 0.99) * 1000,
                "lag_mean": mean([lag for t, lag in lag_samples if lo <= t < hi]),
                "lag_max": max((lag for t, lag in lag_samples if lo <= t < hi), default=0),
            }
        )
    f["thirds"] = thirds
    f["lag_max"] = max((lag for _, lag in lag_samples), default=0)
    f["lag_samples"] = lag_samples
    f["cpu_s_per_1000"] = cpu / max(1, len(ids)) * 1000
    f["worker_busy"] = cpu / wall
    f["others_busy"] = others / wall
    f["peak_rss_bytes"] = rss
    f["e2e_p50_ms"] = percentile(outcomes.timings["e2e_ms"], 0.5)
    f["e2e_p99_ms"] = percentile(outcomes.timings["e2e_ms"], 0.99)
    f["store_p50_ms"] = percentile(outcomes.timings["store_ms"], 0.5)
    f["calls_per_id"] = calls.per_id
    f["ids_called_twice"] = calls.called_twice
    f["lost"] = len(ids) - outcomes.unique_outcomes
    f["errors"] = outcomes.errors
    f["duplicate_outputs"] = outcomes.duplicate_outputs
    return f


async def _steady_at_half(rig: Rig, results: dict[str, Figures]) -> Figures:
    """Scenario 3 at half of scenario 1's throughput (or of what the in-flight limit allows)."""
    options = rig.options
    base = (
        results["s1"]["rps"]
        if "s1" in results
        else options.in_flight / (options.latency_ms / 1000) / 2
    )
    rate = max(1.0, base / 2)
    say(f"scenario 3: steady load at {rate:,.0f} requests/s for {options.steady_seconds:.0f} s")
    return await steady_load(rig, rate)


BENCH_SCALE = 10.0


async def bench_figures(rig: TrafficRig, requests: int = 3000) -> dict[str, Any]:
    """Goodput and adaptation for ``llmstream bench`` (time x10, so it takes a minute, not
    ten: ``llmstream bench-traffic`` runs them in real time)."""
    goodput = await run_goodput(rig, requests=requests, scale=BENCH_SCALE)
    adaptive = await run_adaptive(rig, requests=requests, scale=BENCH_SCALE)
    return {
        "scale": BENCH_SCALE,
        "limit_rpm": goodput.limit_rpm,
        "goodput_rpm": goodput.goodput_rpm,
        "goodput_ratio": goodput.goodput_ratio,
        "share_429": goodput.share_429,
        "adaptive_share_429_after_warmup": adaptive.share_429_after_warmup,
        "adaptive_final_factor": adaptive.final_factor,
        "lost": goodput.lost + adaptive.lost,
        "errors": goodput.errors + adaptive.errors,
        "lines": [goodput.line(BENCH_SCALE), adaptive.line(BENCH_SCALE)],
    }


async def _traffic_control(rig: Rig) -> Figures:
    traffic_rig = TrafficRig(
        rig.bootstrap,
        rig.redis_url,
        rig.workdir,
        idempotent_producer=not rig.services.embedded_broker,
    )
    figures = Figures(await bench_figures(traffic_rig))
    for line in figures["lines"]:
        say(f"scenario 5: {line}")
    return figures


async def run_scenarios(rig: Rig) -> dict[str, Figures]:
    """The scenarios ``rig.options`` names, in order; their figures by ``s1`` ... ``s5``."""
    results: dict[str, Figures] = {}
    runs: dict[int, tuple[str, Callable[[], Awaitable[Figures]]]] = {
        1: ("backlog drain, one worker", lambda: drain_backlog(rig, "s1", 1)),
        2: ("the bare loop", lambda: bare_loop(rig)),
        3: ("steady load", lambda: _steady_at_half(rig, results)),
        4: ("two workers drain the backlog", lambda: drain_backlog(rig, "s4", 2)),
        5: ("traffic control at a rate limit (time x10)", lambda: _traffic_control(rig)),
    }
    for number in rig.options.scenarios:
        what, run = runs[number]
        say(f"scenario {number}: {what}")
        figures = results[f"s{number}"] = await run()
        if "rps" in figures.values:
            say(f"scenario {number}: {figures['rps']:,.0f} requests/s")
    return results
