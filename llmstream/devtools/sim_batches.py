"""Batch jobs in the provider simulator: what OpenAI's Batch API and Anthropic's Message Batches do
between submission and results (the HTTP side is :mod:`llmstream.devtools.sim_batch_api`).

A batch's lines are answered exactly as the synchronous endpoints answer the same body
(:func:`llmstream.devtools.wire.openai_completion` / ``anthropic_message``), so a batch result
equals a synchronous answer. Its life, ``batch_delay_ms`` long:

- OpenAI: ``validating`` (the JSONL file is read: every line a JSON object with ``custom_id``,
  ``method`` POST, ``url`` equal to the batch's endpoint and a ``body`` object holding ``model``;
  ``custom_id`` unique, one model per file, at most 50,000 lines; a file that breaks a rule
  fails the batch with ``errors.data``), ``in_progress``, ``finalizing``, then ``completed`` or
  ``expired``; ``cancelling`` then ``cancelled`` when cancelled. Answers go to the output file,
  line errors (``response.status_code`` 4xx/5xx, or ``error`` with ``batch_expired`` /
  ``batch_cancelled``) to the error file; a file with no line is not written.
- Anthropic: ``in_progress`` (``canceling`` once cancelled), then ``ended`` with one result per
  request (``succeeded``, ``errored``, ``expired`` or ``canceled``); ``params`` are checked when
  the request is processed, as Anthropic does, so a bad one is ``errored``.

Markers in a line's last user message, acting on the first N batches that request (its
``custom_id``) takes part in, or on every batch without ``:N``:

- ``[batch-error:500]``, ``[batch-error:400:1]``: the line fails with that status (a 5xx or 429
  is retryable, a 4xx is not), in the provider's error shape.
- ``[batch-expire]``, ``[batch-expire:1]``: the batch expires instead of completing, and the
  marked lines expire (the others are answered).

``batch_expire_rate`` of batches expire whole (no line answered), and
``POST /_sim/batches/{id}/expire`` expires a batch at once. Request IDs are ``custom_id``\\ s:
the simulator records in which batches each was accepted (``batches_by_request_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
from aiohttp import web

from llmstream.devtools.wire import (
    Wire,
    anthropic_message,
    check_anthropic,
    check_openai,
    error_body,
    last_user_text,
    openai_completion,
)

__all__ = [
    "OPENAI_MAX_BATCH_BYTES",
    "OPENAI_MAX_BATCH_LINES",
    "BatchConfig",
    "BatchFile",
    "BatchStore",
    "Job",
    "Line",
    "Outcome",
]

OPENAI_MAX_BATCH_LINES = 50_000
OPENAI_MAX_BATCH_BYTES = 200 * 1024 * 1024
BATCH_WINDOW_S = 24 * 3600
_ERROR_MARKER = re.compile(r"\[batch-error:([45]\d\d)(?::(\d{1,6}))?\]")
_EXPIRE_MARKER = re.compile(r"\[batch-expire(?::(\d{1,6}))?\]")
_EXPIRED_TEXT = "This request could not be executed before the completion window expired."
_CANCELLED_TEXT = "This request was not executed because the batch was cancelled."
_YIELD_EVERY = 200  # lines answered (five times as many read) between two turns of the loop

Kind = Literal["succeeded", "errored", "expired", "canceled"]
# Internal phases; each API names them its own way when it shows a batch.
Phase = Literal[
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "completed",
    "failed",
    "expired",
    "cancelled",
]
ENDED: frozenset[Phase] = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchConfig(Protocol):
    """The simulator settings a batch reads when it is created."""

    batch_delay_ms: float
    batch_expire_rate: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one line: the answer or error body, with its HTTP status."""

    kind: Kind
    status: int | None = None  # None when the line was never executed
    body: dict[str, Any] | None = None


@dataclass(slots=True)
class Line:
    custom_id: str
    body: Any
    earlier_batches: int = 0  # batches this custom_id was accepted in before this one
    outcome: Outcome | None = None


@dataclass(slots=True)
class BatchFile:
    """An uploaded (or output) file of the OpenAI Files API."""

    id: str
    content: bytes
    filename: str
    purpose: str
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass(slots=True)
class Job:
    """One batch, in either API."""

    id: str
    api: Wire
    delay_s: float
    expire_all: bool
    lines: list[Line] = field(default_factory=list)
    phase: Phase = "in_progress"
    times: dict[str, float] = field(default_factory=dict)  # phase → wall-clock time entered
    created_at: float = field(default_factory=time.time)
    # OpenAI: what the batch was created with, the file to read, validation errors, outputs.
    request: dict[str, Any] = field(default_factory=dict)
    source: bytes = b""
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    model: str | None = None
    # Anthropic: the API version the batch was created with, and its results file.
    version: str | None = None
    results: bytes = b""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: Literal["cancel", "expire"] | None = None
    task: asyncio.Task[None] | None = None

    def enter(self, phase: Phase) -> None:
        self.phase = phase
        self.times[phase] = time.time()

    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    def counts(self) -> Counter[str]:
        return Counter(line.outcome.kind for line in self.lines if line.outcome)


class BatchStore:
    """Files, batches and what was served in them; one per simulator, used from its event loop."""

    def __init__(
        self,
        config: Callable[[], BatchConfig],
        ids: Iterator[int],
        chance: Callable[[], float],
        authorized: Callable[[web.Request, Wire], bool],
    ) -> None:
        self.config = config
        self.ids = ids  # the simulator's answer numbers, so IDs stay unique across endpoints
        self.chance = chance
        self.authorized = authorized
        self.files: dict[str, BatchFile] = {}
        self.jobs: dict[str, Job] = {}
        self.batches_by_request_id: dict[str, list[str]] = {}
        self.outcomes: Counter[str] = Counter()

    # --- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every file and batch; running batches stop where they are."""
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        self.files = {}
        self.jobs = {}
        self.batches_by_request_id = {}
        self.outcomes = Counter()

    async def close(self, _app: web.Application) -> None:
        """Stop every running batch (the app is shutting down)."""
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "batches_total": len(self.jobs),
            "batches_by_status": dict(Counter(job.phase for job in self.jobs.values())),
            "batch_lines_total": sum(len(ids) for ids in self.batches_by_request_id.values()),
            "batch_lines_by_outcome": dict(self.outcomes),
            "batches_by_request_id": self.batches_by_request_id,
        }

    def add_file(self, content: bytes, filename: str, purpose: str) -> BatchFile:
        file = BatchFile(f"file-{uuid.uuid4().hex}", content, filename, purpose, int(time.time()))
        self.files[file.id] = file
        return file

    def new_job(self, api: Wire, prefix: str) -> Job:
        config = self.config()
        job = Job(
            id=f"{prefix}{uuid.uuid4().hex}",
            api=api,
            delay_s=config.batch_delay_ms / 1000,
            expire_all=bool(config.batch_expire_rate) and self.chance() < config.batch_expire_rate,
        )
        job.times["created"] = job.created_at
        job.enter("validating" if api == "openai" else "in_progress")
        return job

    def start(self, job: Job) -> None:
        """Run ``job`` in the background until it ends."""
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))

    def interrupt(self, job: Job, reason: Literal["cancel", "expire"]) -> None:
        """Cancel or expire a running ``job``: lines not yet answered are not answered."""
        if job.ended or job.stop_reason is not None:
            return
        job.stop_reason = reason
        if reason == "cancel":
            job.enter("cancelling")
        job.stop.set()

    # --- a batch's life ---------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        if job.api == "openai":
            job.errors = await self._read_openai_file(job)
            if job.errors:
                job.enter("failed")
                return
        for line in job.lines:
            seen = self.batches_by_request_id.setdefault(line.custom_id, [])
            line.earlier_batches = len(seen)
            seen.append(job.id)
        if job.stop_reason is None:
            job.enter("in_progress")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.stop.wait(), job.delay_s)
        if job.stop_reason is None:
            job.enter("finalizing")
        for i, line in enumerate(job.lines):
            if job.stop_reason is not None:
                break
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            line.outcome = self._execute(job, line)
        left = Outcome("canceled" if job.stop_reason == "cancel" else "expired")
        for line in job.lines:
            if line.outcome is None:
                line.outcome = left
            self.outcomes[line.outcome.kind] += 1
        counts = job.counts()
        if job.stop_reason == "cancel":
            job.enter("cancelled")
        elif counts["expired"] or job.stop_reason == "expire":
            job.enter("expired")
        else:
            job.enter("completed")
        if job.api == "openai":
            self._write_openai_files(job)
        else:
            job.results = b"".join(_anthropic_result(line) for line in job.lines)

    async def _read_openai_file(self, job: Job) -> list[dict[str, Any]]:
        """The file's lines into ``job.lines``; the problems that fail the batch, if any."""
        await asyncio.sleep(0)  # the creation answer says "validating"
        raw = job.source.splitlines()
        rows = [(number, text) for number, text in enumerate(raw, 1) if text.strip()]
        if len(rows) > OPENAI_MAX_BATCH_LINES:
            message = f"The input file has {len(rows)} requests; at most 50,000 are allowed."
            return [_problem("too_many_requests_in_file", message, None, None)]
        if not rows:
            return [_problem("empty_file", "The input file has no requests.", None, None)]
        endpoint = job.request["endpoint"]
        seen: set[str] = set()
        problems: list[dict[str, Any]] = []
        for i, (number, text) in enumerate(rows):
            if i % (_YIELD_EVERY * 5) == _YIELD_EVERY * 5 - 1:
                await asyncio.sleep(0)
            problem = _check_openai_line(text, endpoint, seen, job, number)
            if problem is not None:
                problems.append(problem)
        return problems[:100]

    def _execute(self, job: Job, line: Line) -> Outcome:
        number = next(self.ids)
        body = line.body
        if job.api == "openai":
            problem = check_openai(body) or _no_stream(body)
        else:
            problem = check_anthropic(body, job.version) or _no_stream(body)
        if problem is not None:
            return Outcome("errored", 400, error_body(job.api, 400, problem, number))
        text = last_user_text(job.api, body)
        if job.expire_all or _acts(_EXPIRE_MARKER.search(text), 1, line):
            return Outcome("expired")
        error = _ERROR_MARKER.search(text)
        if error is not None and _acts(error, 2, line):
            status = int(error.group(1))
            return Outcome("errored", status, error_body(job.api, status, None, number))
        if job.api == "openai":
            return Outcome("succeeded", 200, openai_completion(body, number))
        message = anthropic_message(body, number)
        message["usage"] = {**message["usage"], "service_tier": "batch"}
        return Outcome("succeeded", 200, message)

    def _write_openai_files(self, job: Job) -> None:
        ok = [line for line in job.lines if line.outcome and line.outcome.kind == "succeeded"]
        failed = [line for line in job.lines if line.outcome and line.outcome.kind != "succeeded"]
        if ok:
            content = b"".join(_openai_result(line) for line in ok)
            job.output_file_id = self.add_file(content, f"{job.id}_output.jsonl", "batch_output").id
        if failed:
            content = b"".join(_openai_result(line) for line in failed)
            job.error_file_id = self.add_file(content, f"{job.id}_error.jsonl", "batch_output").id


def _check_openai_line(
    text: bytes, endpoint: str, seen: set[str], job: Job, number: int
) -> dict[str, Any] | None:
    """The problem with line ``number`` of a batch input file; else the line joins ``job``."""
    try:
        row = orjson.loads(text)
    except orjson.JSONDecodeError:
        message = "This line is not parseable as valid JSON."
        return _problem("invalid_json_line", message, None, number)
    if not isinstance(row, dict):
        return _problem("invalid_json_line", "Each line must be a JSON object.", None, number)
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _problem(
            "missing_required_parameter", "Missing required parameter.", "custom_id", number
        )
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. The custom_id "
            "parameter must be unique for each request in a batch."
        )
        return _problem("duplicate_custom_id", message, "custom_id", number)
    if row.get("method") != "POST":
        return _problem("invalid_method", "The method must be 'POST'.", "method", number)
    if row.get("url") != endpoint:
        message = f"The url must match the batch's endpoint, '{endpoint}'."
        return _problem("invalid_url", message, "url", number)
    body = row.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        return _problem(
            "missing_required_parameter", "Missing required parameter.", "body.model", number
        )
    if job.model is None:
        job.model = model
    elif model != job.model:
        message = (
            f"The model '{model}' differs from '{job.model}' used by the batch's other requests; "
            "each input file can only include requests to a single model."
        )
        return _problem("mismatched_model", message, "body.model", number)
    seen.add(custom_id)
    job.lines.append(Line(custom_id, body))
    return None


def _problem(code: str, message: str, param: str | None, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _no_stream(body: Any) -> str | None:
    if isinstance(body, dict) and body.get("stream") is True:
        return "stream: batch requests cannot be streamed"
    return None


def _acts(marker: re.Match[str] | None, count_group: int, line: Line) -> bool:
    """Whether a marker found in the line acts on this batch of the line's request: on every
    batch, or on the first N (the marker's count)."""
    if marker is None:
        return False
    count = marker.group(count_group)
    return count is None or line.earlier_batches < int(count)


def _openai_result(line: Line) -> bytes:
    outcome = line.outcome
    assert outcome is not None  # every line has one once its batch ended
    response: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    if outcome.status is not None:
        response = {
            "status_code": outcome.status,
            "request_id": uuid.uuid4().hex,
            "body": outcome.body,
        }
    elif outcome.kind == "expired":
        error = {"code": "batch_expired", "message": _EXPIRED_TEXT}
    else:
        error = {"code": "batch_cancelled", "message": _CANCELLED_TEXT}
    row = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": response,
        "error": error,
    }
    return orjson.dumps(row) + b"\n"


def _anthropic_result(line: Line) -> bytes:
    outcome = line.outcome
    assert outcome is not None  # every line has one once its batch ended
    result: dict[str, Any] = {"type": outcome.kind}
    if outcome.kind == "succeeded":
        result["message"] = outcome.body
    elif outcome.kind == "errored":
        result["error"] = outcome.body
    return orjson.dumps({"custom_id": line.custom_id, "result": result}) + b"\n"
