"""The provider simulator's batch endpoints, in OpenAI's and Anthropic's shapes (what happens to a
batch is :mod:`llmstream.devtools.sim_batches`).

OpenAI (Files and Batches)::

    POST /v1/files                     multipart: file (a .jsonl for purpose "batch", at most
                                       200 MB), purpose
    GET  /v1/files/{file_id}           the file object
    GET  /v1/files/{file_id}/content   its bytes (input, output or error file)
    DELETE /v1/files/{file_id}
    POST /v1/batches                   {"input_file_id", "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h", "metadata"}
    GET  /v1/batches?limit=&after=     newest first, ``limit`` 1 to 100 (20 by default),
                                       ``after`` a batch ID: {"object": "list", "data",
                                       "first_id", "last_id", "has_more"}
    GET  /v1/batches/{batch_id}
    POST /v1/batches/{batch_id}/cancel

Anthropic (Message Batches)::

    POST /v1/messages/batches                    {"requests": [{"custom_id", "params"}]}: at
                                                 most 100,000 requests and 256 MB; custom_id
                                                 unique, ^[a-zA-Z0-9_-]{1,64}$
    GET  /v1/messages/batches/{id}
    GET  /v1/messages/batches/{id}/results       JSONL, once processing_status is "ended"
    POST /v1/messages/batches/{id}/cancel

Control: ``POST /_sim/batches/{id}/expire`` expires a running batch of either API now.
Batch endpoints take the API key as the synchronous ones do and are not rate-limited (the
providers give batches a pool of their own); they are not counted as calls.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from llmstream.devtools.sim_batches import (
    BATCH_WINDOW_S,
    ENDED,
    OPENAI_MAX_BATCH_BYTES,
    BatchFile,
    BatchStore,
    Job,
    Line,
)
from llmstream.devtools.wire import Wire, error_body

__all__ = ["BATCHES", "add_batch_routes"]

BATCHES = web.AppKey("llmstream_simulator_batches", BatchStore)

ANTHROPIC_MAX_REQUESTS = 100_000
ANTHROPIC_MAX_BYTES = 256 * 1024 * 1024
OPENAI_MAX_FILE_BYTES = 512 * 1024 * 1024
CHAT_ENDPOINT = "/v1/chat/completions"
_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CHUNK = 1 << 20
_LIST_DEFAULT = 20
_LIST_MAX = 100

Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_batch_routes(app: web.Application, store: BatchStore) -> None:
    """Serve both providers' batch endpoints from ``store``."""
    app[BATCHES] = store
    app.on_cleanup.append(store.close)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/files/{file_id}", _file)
    app.router.add_get("/v1/files/{file_id}/content", _file_content)
    app.router.add_delete("/v1/files/{file_id}", _delete_file)
    app.router.add_post("/v1/batches", _create_openai)
    app.router.add_get("/v1/batches", _list_openai)
    app.router.add_get("/v1/batches/{batch_id}", _get_openai)
    app.router.add_post("/v1/batches/{batch_id}/cancel", _cancel_openai)
    app.router.add_post("/v1/messages/batches", _create_anthropic)
    app.router.add_get("/v1/messages/batches/{batch_id}", _get_anthropic)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", _anthropic_results)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", _cancel_anthropic)
    app.router.add_post("/_sim/batches/{batch_id}/expire", _expire)


# --- what every endpoint checks first ----------------------------------------------------------


def _authorized(
    wire: Wire,
) -> Callable[[Callable[[web.Request, BatchStore], Awaitable[web.Response]]], Handler]:
    """Serve a request only with ``wire``'s API key, answering 401 as that provider does."""

    def wrap(handler: Callable[[web.Request, BatchStore], Awaitable[web.Response]]) -> Handler:
        @functools.wraps(handler)
        async def serve(request: web.Request) -> web.Response:
            store = request.app[BATCHES]
            if not store.authorized(request, wire):
                return _json(error_body(wire, 401, None, next(store.ids)), 401)
            return await handler(request, store)

        return serve

    return wrap


def _with_batch(
    wire: Wire,
) -> Callable[[Callable[[web.Request, BatchStore, Job], web.Response]], Handler]:
    """Authorized as ``wire``, then the batch of that API named in the path, or its 404."""

    def wrap(handler: Callable[[web.Request, BatchStore, Job], web.Response]) -> Handler:
        @_authorized(wire)
        async def serve(request: web.Request, store: BatchStore) -> web.Response:
            batch_id = request.match_info["batch_id"]
            job = store.jobs.get(batch_id)
            if job is not None and job.api == wire:
                return handler(request, store, job)
            if wire == "openai":
                return _openai_error(404, f"No batch found with id '{batch_id}'.")
            return _anthropic_error(store, 404, f"No Message Batch with ID {batch_id}.")

        return functools.wraps(handler)(serve)

    return wrap


def _with_file(handler: Callable[[BatchStore, BatchFile], web.Response]) -> Handler:
    """Authorized as OpenAI, then the file named in the path, or OpenAI's 404."""

    @_authorized("openai")
    async def serve(request: web.Request, store: BatchStore) -> web.Response:
        file = store.files.get(request.match_info["file_id"])
        if file is None:
            return _no_file(request.match_info["file_id"])
        return handler(store, file)

    return functools.wraps(handler)(serve)


# --- OpenAI ----------------------------------------------------------------------------------


@_authorized("openai")
async def _upload(request: web.Request, store: BatchStore) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        return _openai_error(400, "The request must be multipart/form-data.", param="file")
    content: bytes | None = None
    filename = ""
    purpose: str | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = await part.text()
        elif part.name == "file":
            filename = part.filename or ""
            content = await _read_part(part, OPENAI_MAX_FILE_BYTES)
            if content is None:
                return _openai_error(413, "The file exceeds the maximum size.", param="file")
    if content is None:
        return _openai_error(400, "Missing required parameter: 'file'.", param="file")
    if purpose not in _FILE_PURPOSES:
        return _openai_error(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
    if purpose == "batch":
        if not filename.endswith(".jsonl"):
            message = "Invalid file format for Batch API. Must be .jsonl"
            return _openai_error(400, message, param="file")
        if len(content) > OPENAI_MAX_BATCH_BYTES:
            message = "File is too large for the Batch API: the maximum is 200 MB."
            return _openai_error(400, message, param="file")
    return _json(store.add_file(content, filename, purpose).as_json())


async def _read_part(part: BodyPartReader, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@_with_file
def _file(store: BatchStore, file: BatchFile) -> web.Response:
    return _json(file.as_json())


@_with_file
def _file_content(store: BatchStore, file: BatchFile) -> web.Response:
    return web.Response(body=file.content, content_type="application/octet-stream")


@_with_file
def _delete_file(store: BatchStore, file: BatchFile) -> web.Response:
    del store.files[file.id]
    return _json({"id": file.id, "object": "file", "deleted": True})


@_authorized("openai")
async def _create_openai(request: web.Request, store: BatchStore) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _openai_error(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _openai_error(400, "The request body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            return _openai_error(400, f"Missing required parameter: '{name}'.", param=name)
    if body["completion_window"] != "24h":
        message = "Invalid value for 'completion_window': only '24h' is supported."
        return _openai_error(400, message, param="completion_window")
    if body["endpoint"] != CHAT_ENDPOINT:
        message = f"The simulator runs batches for {CHAT_ENDPOINT} only."
        return _openai_error(400, message, param="endpoint")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return _openai_error(400, "Invalid type for 'metadata'.", param="metadata")
    file = store.files.get(body["input_file_id"])
    if file is None:
        return _no_file(body["input_file_id"], param="input_file_id")
    if file.purpose != "batch":
        message = "The input file must be uploaded with purpose 'batch'."
        return _openai_error(400, message, param="input_file_id")
    job = store.new_job("openai", "batch_")
    job.request = {
        "endpoint": CHAT_ENDPOINT,
        "input_file_id": file.id,
        "completion_window": "24h",
        "metadata": metadata,
    }
    job.source = file.content
    store.start(job)
    return _json(_openai_batch(job))


@_authorized("openai")
async def _list_openai(request: web.Request, store: BatchStore) -> web.Response:
    raw_limit = request.query.get("limit", str(_LIST_DEFAULT))
    try:
        limit = int(raw_limit)
    except ValueError:
        message = f"Invalid 'limit': expected an integer, but got {raw_limit!r} instead."
        return _openai_error(400, message, param="limit", code="invalid_type")
    if not 1 <= limit <= _LIST_MAX:
        below = limit < 1
        message = (
            f"Invalid 'limit': integer {'below minimum' if below else 'above maximum'} value. "
            f"Expected a value {'>= 1' if below else f'<= {_LIST_MAX}'}, but got {limit} instead."
        )
        code = "integer_below_min_value" if below else "integer_above_max_value"
        return _openai_error(400, message, param="limit", code=code)
    newest_first = [job for job in reversed(store.jobs.values()) if job.api == "openai"]
    after = request.query.get("after")
    if after is not None:
        # The page after that batch; a cursor naming no batch lists nothing.
        ids = [job.id for job in newest_first]
        newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
    page = [_openai_batch(job) for job in newest_first[:limit]]
    return _json(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest_first) > limit,
        }
    )


@_with_batch("openai")
def _get_openai(request: web.Request, store: BatchStore, job: Job) -> web.Response:
    return _json(_openai_batch(job))


@_with_batch("openai")
def _cancel_openai(request: web.Request, store: BatchStore, job: Job) -> web.Response:
    if job.ended:
        return _openai_error(400, f"Cannot cancel a batch with status '{job.phase}'.")
    store.interrupt(job, "cancel")
    return _json(_openai_batch(job))


def _openai_batch(job: Job) -> dict[str, Any]:
    counts = job.counts()
    usage = {"input_tokens": 0, "output_tokens": 0}
    for line in job.lines:
        if line.outcome and line.outcome.kind == "succeeded" and line.outcome.body:
            tokens = line.outcome.body["usage"]
            usage["input_tokens"] += tokens["prompt_tokens"]
            usage["output_tokens"] += tokens["completion_tokens"]
    errors = {"object": "list", "data": job.errors} if job.errors else None
    return {
        "id": job.id,
        "object": "batch",
        "endpoint": job.request["endpoint"],
        "model": job.model,
        "errors": errors,
        "input_file_id": job.request["input_file_id"],
        "completion_window": job.request["completion_window"],
        "status": job.phase,
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "created_at": int(job.created_at),
        "in_progress_at": _unix(job, "in_progress"),
        "expires_at": int(job.created_at + BATCH_WINDOW_S),
        "finalizing_at": _unix(job, "finalizing"),
        "completed_at": _unix(job, "completed"),
        "failed_at": _unix(job, "failed"),
        "expired_at": _unix(job, "expired"),
        "cancelling_at": _unix(job, "cancelling"),
        "cancelled_at": _unix(job, "cancelled"),
        "request_counts": {
            "total": len(job.lines),
            "completed": counts["succeeded"],
            "failed": counts.total() - counts["succeeded"],
        },
        "usage": {
            **usage,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["input_tokens"] + usage["output_tokens"],
        },
        "metadata": job.request["metadata"],
    }


def _unix(job: Job, phase: str) -> int | None:
    at = job.times.get(phase)
    return None if at is None else int(at)


def _openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return _json(body, status)


def _no_file(file_id: str, param: str = "id") -> web.Response:
    return _openai_error(404, f"No such File object: {file_id}", param=param)


# --- Anthropic -------------------------------------------------------------------------------


@_authorized("anthropic")
async def _create_anthropic(request: web.Request, store: BatchStore) -> web.Response:
    version = request.headers.get("anthropic-version")
    if not version:
        return _anthropic_error(store, 400, "anthropic-version: header is required")
    raw = await _read_limited(request, ANTHROPIC_MAX_BYTES)
    if raw is None:
        return _anthropic_error(store, 413, "Batch exceeds the maximum size of 256 MB.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _anthropic_error(store, 400, "The request body is not valid JSON.")
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        return _anthropic_error(store, 400, "requests: at least one request is required")
    if len(requests) > ANTHROPIC_MAX_REQUESTS:
        message = f"requests: at most {ANTHROPIC_MAX_REQUESTS} requests are allowed in a batch"
        return _anthropic_error(store, 400, message)
    job = store.new_job("anthropic", "msgbatch_")
    job.version = version
    seen: set[str] = set()
    for i, item in enumerate(requests):
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
            pattern = _CUSTOM_ID.pattern
            message = f"requests.{i}.custom_id: String should match pattern '{pattern}'"
            return _anthropic_error(store, 400, message)
        if custom_id in seen:
            message = f"requests.{i}.custom_id: Duplicate custom_id '{custom_id}' in the batch."
            return _anthropic_error(store, 400, message)
        if not isinstance(item.get("params"), dict):
            return _anthropic_error(store, 400, f"requests.{i}.params: Field required")
        seen.add(custom_id)
        job.lines.append(Line(custom_id, item["params"]))
    store.start(job)
    return _json(_anthropic_batch(job, request))


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@_with_batch("anthropic")
def _get_anthropic(request: web.Request, store: BatchStore, job: Job) -> web.Response:
    return _json(_anthropic_batch(job, request))


@_with_batch("anthropic")
def _anthropic_results(request: web.Request, store: BatchStore, job: Job) -> web.Response:
    if not job.ended:
        message = f"Message Batch {job.id} has not ended yet: its results are not available."
        return _anthropic_error(store, 404, message)
    return web.Response(body=job.results, content_type="application/binary")


@_with_batch("anthropic")
def _cancel_anthropic(request: web.Request, store: BatchStore, job: Job) -> web.Response:
    if job.ended:
        return _anthropic_error(store, 400, f"Message Batch {job.id} has already ended.")
    store.interrupt(job, "cancel")
    return _json(_anthropic_batch(job, request))


def _anthropic_batch(job: Job, request: web.Request) -> dict[str, Any]:
    counts = job.counts()
    ended = job.ended
    status = "ended" if ended else "canceling" if job.stop_reason == "cancel" else "in_progress"
    results_url = None
    if ended:
        results_url = f"{request.url.origin()}/v1/messages/batches/{job.id}/results"
    return {
        "id": job.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            # As Anthropic counts: every request is processing until the whole batch ends.
            "processing": 0 if ended else len(job.lines),
            "succeeded": counts["succeeded"] if ended else 0,
            "errored": counts["errored"] if ended else 0,
            "canceled": counts["canceled"] if ended else 0,
            "expired": counts["expired"] if ended else 0,
        },
        "ended_at": _rfc3339(max(job.times[p] for p in ENDED if p in job.times)) if ended else None,
        "created_at": _rfc3339(job.created_at),
        "expires_at": _rfc3339(job.created_at + BATCH_WINDOW_S),
        "archived_at": None,
        "cancel_initiated_at": _rfc3339(job.times["cancelling"])
        if "cancelling" in job.times
        else None,
        "results_url": results_url,
    }


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _anthropic_error(store: BatchStore, status: int, message: str) -> web.Response:
    return _json(error_body("anthropic", status, message, next(store.ids)), status)


# --- shared ----------------------------------------------------------------------------------


async def _expire(request: web.Request) -> web.Response:
    store = request.app[BATCHES]
    job = store.jobs.get(request.match_info["batch_id"])
    if job is None:
        return _json({"error": "no such batch"}, 404)
    if job.ended:
        return _json({"error": "the batch has ended", "status": job.phase}, 409)
    store.interrupt(job, "expire")
    if job.task is not None:
        await asyncio.wait([job.task])  # answer once the batch has ended
    return _json({"id": job.id, "status": job.phase})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
