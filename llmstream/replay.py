"""``llmstream replay``: publish failed requests from ``llm-errors`` to ``llm-requests`` again.

It selects error events by error type, by when they happened (the event's ``occurred_at_ms``) and
by request ID, keeps the newest one per request ID, and publishes each one's original request
(``LLMError.request``) keyed by its request ID. An event without a request (undecodable or
invalid input) cannot be replayed; it is listed as skipped.

A replayed request keeps its ID, so whoever waits for it (``GET /v1/requests/{id}``, a consumer
of ``llm-responses`` matching on the ID) gets the new outcome under the ID it knows. The workers'
dedup would take a known ID for a duplicate, so before publishing, one script of the request record
(:mod:`llmstream.core.record`) resets it from ``failed`` to ``queued`` (keeping what the ingress
recorded: client, digest). An
ID whose record says ``completed`` (it succeeded since, for instance replayed already) or
``claimed`` (a worker has it now) is not published: replay never pays twice for a request that
succeeded. An ID whose record is ``queued`` is published as it is.

An ID whose record is gone (expired after ``LLMSTREAM_RESULT_TTL_S``) is not published unless
``--include-expired`` is given: without the record llmstream cannot know whether the request
succeeded since (an earlier replay, say), so publishing it could pay twice. It is listed as
``record expired``. ``--dry-run`` reads the same records and changes nothing.

Each partition is read from its start, or with ``--since`` from the first offset at or after that
time when the broker answers ListOffsets by timestamp (Tansu answers without a timestamp: then
from the start), up to its end offset taken when the scan began (whatever is written after that
is not part of what was asked for), however long the broker takes to hand it over. The summary
says how many events were read of how many the topic held; a scan that cannot get there within
``stall_s`` without progress fails saying so, rather than replaying a part.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmstream.core.clock import wall_clock_ms
from llmstream.core.connections import (
    kafka_client_options,
    kafka_producer_options,
    negotiate_idempotence,
    redis_client,
)
from llmstream.core.errors import LLMStreamError
from llmstream.core.record import RecordStore
from llmstream.core.settings import ServiceSettings
from llmstream.schemas.codec import DecodeError, decode, encode, message_key
from llmstream.schemas.models import LLMError

# Records are stamped by their producer's clock; allow that much skew against ours when
# deciding where to start (--since).
_CLOCK_SKEW_MS = 60_000

# What replay does with an ID, by its record's state (or the script's answer); "absent" only
# with include_expired.
_PUBLISH = {"failed", "reset", "queued"}
_SKIP_REASONS = {
    "completed": "succeeded since",
    "claimed": "in progress",
    "absent": "record expired: not replayed",
}


class ReplayError(LLMStreamError):
    """Replay cannot run as asked (a topic is missing, a time cannot be read)."""


def parse_time(value: str) -> int:
    """Epoch milliseconds from epoch milliseconds or an ISO 8601 time (UTC unless it says)."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            f"{value!r} is neither an ISO 8601 time (2025-01-31T12:00:00Z) nor epoch milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Selection:
    """Which error events to replay; empty criteria select everything."""

    error_types: frozenset[str] = frozenset()
    request_ids: frozenset[str] = frozenset()
    since_ms: int | None = None  # occurred_at_ms >= since_ms
    until_ms: int | None = None  # occurred_at_ms < until_ms
    limit: int | None = None  # at most this many request IDs, the oldest errors first

    def matches(self, error: LLMError) -> bool:
        if self.error_types and error.error_type not in self.error_types:
            return False
        if self.request_ids and error.request_id not in self.request_ids:
            return False
        if self.since_ms is not None and error.occurred_at_ms < self.since_ms:
            return False
        return self.until_ms is None or error.occurred_at_ms < self.until_ms


@dataclass
class ReplayReport:
    """What a replay found and did."""

    scanned: int = 0  # error events read
    expected: int = 0  # error events the topic held, from where the scan began, at its start
    selected: list[LLMError] = field(default_factory=list)  # newest per request ID
    replayed: list[str] = field(default_factory=list)  # published (or, dry run, would be)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> request IDs

    def skip(self, reason: str, request_id: str) -> None:
        self.skipped.setdefault(reason, []).append(request_id)


async def replay(
    settings: ServiceSettings,
    selection: Selection,
    *,
    dry_run: bool = False,
    clear_deadline: bool = False,
    include_expired: bool = False,
    stall_s: float = 30.0,
    out: TextIO = sys.stdout,
) -> ReplayReport:
    """Replay the selected errors' requests (or, ``dry_run``, say what would be replayed).

    ``include_expired`` publishes requests whose record is gone too (see the module docstring).
    """
    report = ReplayReport()
    scan = await scan_errors(settings, selection, stall_s=stall_s)
    report.scanned, report.expected, report.selected = scan.read, scan.expected, scan.selected
    if not report.selected:
        _summary(report, dry_run, out)
        return report
    producer: AIOKafkaProducer | None = None
    if not dry_run:
        # Started before any record is reset to pending, so a broker that cannot be reached
        # leaves every record as it was.
        settings = await negotiate_idempotence(settings)
        producer = AIOKafkaProducer(
            **kafka_producer_options(settings), client_id="llmstream-replay"
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
    redis = redis_client(settings)
    try:
        records = RecordStore(
            redis, key_prefix=settings.redis_key_prefix, ttl_s=settings.result_ttl_s
        )
        token = f"replay-{time.time_ns()}"
        pending = []
        for error in report.selected:
            request_id = error.request_id or "?"
            request = error.request
            if request is None:
                report.skip("no request to replay", request_id)
                _line(out, "skip (no request)", error)
                continue
            if dry_run:
                state = await records.state(request.request_id) or "absent"
            else:
                state = await records.reset_failed(
                    request.request_id, now_ms=wall_clock_ms(), token=token
                )
            if state not in _PUBLISH and not (state == "absent" and include_expired):
                reason = _SKIP_REASONS.get(state, state)
                report.skip(reason, request.request_id)
                _line(out, f"skip ({reason})", error)
                continue
            if clear_deadline:
                request = request.model_copy(update={"deadline_ms": None})
            report.replayed.append(request.request_id)
            if producer is None:
                _line(out, "would replay", error)
                continue
            value = encode(request, settings.output_format)
            pending.append(
                await producer.send(settings.requests_topic, value, key=message_key(request))
            )
            _line(out, "replayed", error)
        # Every publication acknowledged by the brokers, or this raises.
        await asyncio.gather(*pending)
    finally:
        if producer is not None:
            await producer.stop()
        await redis.aclose()
    _summary(report, dry_run, out)
    return report


@dataclass(frozen=True)
class Scan:
    """What :func:`scan_errors` read."""

    read: int  # error events read
    expected: int  # offsets from where each partition's scan began to where it ended (the end
    # offset taken at the start, or the end of the batch holding it)
    selected: list[LLMError]  # the newest selected error per request ID, oldest first


async def scan_errors(
    settings: ServiceSettings, selection: Selection, *, stall_s: float = 30.0
) -> Scan:
    """Read ``llm-errors`` up to its end offsets taken when the scan begins; the newest selected
    error per request ID (errors without an ID are kept each), oldest first, at most ``limit``.

    Raises :class:`ReplayError` when no event arrives for ``stall_s`` before the end is reached.
    """
    consumer = AIOKafkaConsumer(
        **kafka_client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        # The reset that assign() starts can land after seek_to_beginning() and win: with the
        # default "latest", a scan then began at the end (seen on Tansu) and read nothing.
        auto_offset_reset="earliest",
        client_id="llmstream-replay",
    )
    await consumer.start()
    try:
        topic = settings.errors_topic
        await consumer.topics()
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise ReplayError(f"topic {topic!r} does not exist")
        partitions = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        # Events written after this are not part of what was asked for (and the topic may never
        # be quiet). Tansu answers the newest batch's base offset + 1, short of the records
        # after it in that batch; a fetch hands over whole batches, so reading until the
        # position passes this end reads that batch to its end as well.
        ends = await consumer.end_offsets(partitions)
        active = await _seek(consumer, partitions, selection.since_ms)
        expected = 0
        for tp in list(active):
            start = await consumer.position(tp)
            expected += max(0, ends[tp] - start)
            if start >= ends[tp]:
                active.discard(tp)
        scanned = 0
        newest: dict[str, LLMError] = {}
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        while active:
            batches = await consumer.getmany(*active, timeout_ms=1000)
            if not batches and loop.time() - progress_at > stall_s:
                behind = ", ".join(f"{tp.partition}" for tp in sorted(active))
                raise ReplayError(
                    f"{topic!r}: read {scanned} of {expected} error events, then nothing for "
                    f"{stall_s:.0f} s (partitions {behind}); nothing was replayed"
                )
            for tp, records in batches.items():
                progress_at = loop.time()
                for record in records:
                    scanned += 1
                    try:
                        error = decode(record.value or b"", LLMError)
                    except DecodeError:
                        continue
                    if selection.matches(error):
                        key = error.request_id or f"@{tp.partition}:{record.offset}"
                        newest.pop(key, None)  # the newest event of an ID counts
                        newest[key] = error
                position = await consumer.position(tp)
                if position >= ends[tp]:
                    # Past the end taken at the start only by the rest of a batch handed over
                    # whole (on Tansu, the end's own batch): those were expected too.
                    expected += position - ends[tp]
                    active.discard(tp)
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    selected = sorted(newest.values(), key=lambda e: e.occurred_at_ms)
    if selection.limit is not None:
        selected = selected[: selection.limit]
    return Scan(scanned, expected, selected)


async def _seek(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition], since_ms: int | None
) -> set[TopicPartition]:
    """Position each partition where the selection can begin; returns those worth reading."""
    if since_ms is None:
        await consumer.seek_to_beginning(*partitions)
        return set(partitions)
    start_ms = max(0, since_ms - _CLOCK_SKEW_MS)
    found = await consumer.offsets_for_times(dict.fromkeys(partitions, start_ms))
    active = set()
    for tp in partitions:
        hit = found.get(tp)
        if hit is None:
            continue  # Apache Kafka: nothing written at or after that time
        if hit.timestamp < 0:
            await consumer.seek_to_beginning(tp)  # Tansu: no answer by time; read it all
        else:
            consumer.seek(tp, hit.offset)
        active.add(tp)
    return active


def _line(out: TextIO, action: str, error: LLMError) -> None:
    when = datetime.fromtimestamp(error.occurred_at_ms / 1000, UTC).isoformat(
        timespec="milliseconds"
    )
    status = f" {error.status_code}" if error.status_code is not None else ""
    out.write(
        f"{action:<26} {error.request_id or '-'}  {error.error_type}{status}  {when}  "
        f"{_shorten(error.message)}\n"
    )


def _shorten(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _summary(report: ReplayReport, dry_run: bool, out: TextIO) -> None:
    verb = "would replay" if dry_run else "replayed"
    skipped = ", ".join(f"{len(ids)} {reason}" for reason, ids in report.skipped.items())
    out.write(
        f"{report.scanned} error events read of {report.expected} expected, "
        f"{len(report.selected)} selected: "
        f"{verb} {len(report.replayed)}" + (f"; skipped {skipped}" if skipped else "") + "\n"
    )


def selection_from(
    *,
    error_types: Iterable[str] = (),
    request_ids: Iterable[str] = (),
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
) -> Selection:
    """A :class:`Selection` from command-line values."""
    return Selection(
        error_types=frozenset(error_types),
        request_ids=frozenset(request_ids),
        since_ms=parse_time(since) if since is not None else None,
        until_ms=parse_time(until) if until is not None else None,
        limit=limit,
    )
