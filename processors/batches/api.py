"""The providers' batch APIs, as their own documentation gives them: OpenAI's Files and Batches
(``POST /v1/files`` with a JSONL file of ``purpose=batch``, ``POST /v1/batches``, ``GET
/v1/batches/{id}``, the output and error files) and Anthropic's Message Batches (``POST
/v1/messages/batches``, ``GET /v1/messages/batches/{id}``, its ``/results`` JSONL).

A line's body is the adapter's own (:meth:`HTTPAdapter.request_body`): a request in a batch is
sent exactly as its synchronous call would be. Answers are read by the adapter too, and
failures classified as :mod:`processors.providers.http` classifies a call's: a line's 5xx or 429
is retryable, a 4xx is not. Endpoints come from configuration only (Anthropic's ``results_url``
is not followed: the results are read from the configured base URL).
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import orjson
from pydantic import SecretStr
from yarl import URL

from llmstream.processors.providers import Completion, ErrorType, ProviderError, ProviderRouter
from llmstream.processors.providers.anthropic import AnthropicMessages
from llmstream.processors.providers.http import (
    ErrorFields,
    HTTPAdapter,
    endpoint_label,
    endpoint_url,
    redact,
    status_classification,
)
from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.providers.settings import ProviderSettings
from llmstream.processors.providers.toolcalls import MalformedAnswer
from llmstream.schemas.models import LLMRequest

__all__ = ["AnthropicBatches", "BatchAPI", "BatchLine", "BatchStatus", "LineResult", "batch_apis"]

log = logging.getLogger(__name__)

_SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, MalformedAnswer)
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MAX_RAW_LINE = 64 * 1024  # of an unreadable result line, kept on its error event for replay
OPENAI_ENDPOINT = "/v1/chat/completions"
METADATA_KEY = "llmstream_submission"


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request as a line of a batch: its body is the synchronous call's."""

    request_id: str
    custom_id: str
    body: dict[str, Any]
    size: int  # bytes it adds to the batch


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """What the provider says of a batch."""

    status: str  # the provider's own word (validating, in_progress, ended, expired ...)
    ended: bool
    output_file: str | None = None
    error_file: str | None = None
    # A batch refused as a whole (OpenAI's validation): each error, with its 1-based line.
    errors: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class LineResult:
    """What became of one line: an answer, a failure, or nothing (``unanswered``: the batch
    expired or was cancelled before it ran; retried like a retryable failure)."""

    completion: Completion | None = None
    error: ProviderError | None = None
    unanswered: str | None = None  # expired, cancelled, missing
    raw: bytes | None = None  # the result line, when it could not be read


class BatchAPI(ABC):
    """One provider's batch API, on the shared HTTP client, speaking its adapter's format."""

    max_requests: ClassVar[int]
    max_bytes: ClassVar[int]
    # A batch's fixed bytes around its lines, and per line, kept free under max_bytes.
    overhead: ClassVar[int] = 4096
    can_find: ClassVar[bool] = False

    def __init__(
        self,
        adapter: HTTPAdapter,
        client: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr | None,
    ) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self._client = client
        key = api_key.get_secret_value() if api_key is not None else ""
        self._headers = adapter.wire_headers(key)
        self._secrets = tuple(v for v in (key, *self._headers.values()) if len(v) >= 8)
        self._base = base_url

    def custom_id(self, request_id: str) -> str:
        """The line's ``custom_id`` for a request ID (the batch keeps the pair)."""
        return request_id

    def line(self, request: LLMRequest, model: str, custom_id: str) -> BatchLine:
        """``request`` as a line; ProviderError when this API cannot express it."""
        body = self.adapter.request_body(request, model)
        return BatchLine(request.request_id, custom_id, body, len(orjson.dumps(body)) + 200)

    @abstractmethod
    async def create(self, lines: Sequence[BatchLine], model: str, submission: str) -> str:
        """Submit the lines; the provider's batch ID."""

    @abstractmethod
    async def status(self, batch: str) -> BatchStatus: ...

    @abstractmethod
    async def results(
        self, batch: str, status: BatchStatus, model: str, custom_ids: Sequence[str]
    ) -> dict[str, LineResult]:
        """Each line's result by ``custom_id`` (a line without one is missing)."""

    @abstractmethod
    async def cancel(self, batch: str) -> None: ...

    async def find(self, submission: str, since_ms: int) -> str | None:
        """The batch created for ``submission``, if the provider can say (``can_find``)."""
        return None

    # -- HTTP ------------------------------------------------------------------------------------

    async def _send(self, method: str, url: URL, **kwargs: Any) -> bytes:
        where = endpoint_label(url)
        try:
            async with self._client.request(
                method, url, headers=self._headers, allow_redirects=False, **kwargs
            ) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind: ErrorType = "timeout" if isinstance(exc, TimeoutError) else "connection_error"
            detail = redact(str(exc) or type(exc).__name__, self._secrets)[:300]
            raise ProviderError(
                f"{self.name}: batch API at {where} failed ({type(exc).__name__}: {detail})",
                provider=self.name,
                error_type=kind,
                retryable=True,
            ) from exc
        if not 200 <= status < 300:
            error = _error_object(body)
            raise self.failure(status, error, f"HTTP {status} from {where}", body)
        return body

    async def _json(self, method: str, url: URL, **kwargs: Any) -> Any:
        body = await self._send(method, url, **kwargs)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            what = f"the batch API at {endpoint_label(url)} answered no JSON"
            raise self.malformed(what, body) from None

    def failure(
        self, status: int, error: object, what: str, raw: bytes | None = None
    ) -> ProviderError:
        """A failure with ``status`` whose error object is ``error``: classified as a call's."""
        fields = self.adapter.error_fields(error) if isinstance(error, dict) else ErrorFields()
        error_type, retryable = status_classification(status)
        error_type = self.adapter.error_types.get(fields.kind, error_type)
        if status == 429 and not self.adapter.quota_codes.isdisjoint((fields.kind, fields.code)):
            retryable = False
        label = "/".join(part for part in (fields.kind, fields.code) if part)
        detail = f"{label}: {fields.message}" if label else fields.message
        message = redact(f"{self.name}: {what}" + (f": {detail}" if detail else ""), self._secrets)
        return ProviderError(
            message[:600],
            provider=self.name,
            error_type=error_type,
            retryable=retryable,
            status_code=status,
            body=redact(raw[:4096].decode("utf-8", "replace"), self._secrets) if raw else None,
        )

    def malformed(self, what: str, raw: bytes | None = None) -> ProviderError:
        return ProviderError(
            f"{self.name}: {what}",
            provider=self.name,
            error_type="provider_error",
            retryable=False,
            body=redact(raw[:4096].decode("utf-8", "replace"), self._secrets) if raw else None,
        )

    def unreadable(self, raw: bytes, exc: Exception) -> LineResult:
        """A result line of this batch that cannot be read: failed, the line kept for replay."""
        reason = f"malformed batch result ({type(exc).__name__})"
        return LineResult(error=self.malformed(reason, raw), raw=raw[:_MAX_RAW_LINE])

    def answer(self, status: int, body: object, model: str, raw: bytes) -> LineResult:
        """One line's HTTP answer (its status and body) as a result."""
        if 200 <= status < 300:
            try:
                return LineResult(completion=self.adapter.parse_completion(body, model))
            except _SHAPE_ERRORS as exc:
                return self.unreadable(raw, exc)
        error = body.get("error") if isinstance(body, dict) else None
        return LineResult(error=self.failure(status, error, f"batch line answered HTTP {status}"))


class OpenAIBatches(BatchAPI):
    """OpenAI's Files and Batches APIs (``base_url`` as ``OPENAI_BASE_URL`` gives it)."""

    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    can_find = True

    async def create(self, lines: Sequence[BatchLine], model: str, submission: str) -> str:
        content = b"".join(
            orjson.dumps(
                {
                    "custom_id": line.custom_id,
                    "method": "POST",
                    "url": OPENAI_ENDPOINT,
                    "body": line.body,
                }
            )
            + b"\n"
            for line in lines
        )
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file",
            content,
            filename=f"llmstream-{submission}.jsonl",
            content_type="application/jsonl",
        )
        uploaded = await self._json("POST", endpoint_url(self._base, "/files"), data=form)
        created = await self._json(
            "POST",
            endpoint_url(self._base, "/batches"),
            json={
                "input_file_id": uploaded["id"],
                "endpoint": OPENAI_ENDPOINT,
                "completion_window": "24h",
                "metadata": {METADATA_KEY: submission},
            },
        )
        return str(created["id"])

    async def status(self, batch: str) -> BatchStatus:
        data = await self._json("GET", endpoint_url(self._base, f"/batches/{batch}"))
        status = str(data.get("status"))
        errors = (data.get("errors") or {}).get("data") or ()
        return BatchStatus(
            status,
            status in ("completed", "failed", "expired", "cancelled"),
            data.get("output_file_id"),
            data.get("error_file_id"),
            tuple(e for e in errors if isinstance(e, dict)),
        )

    async def results(
        self, batch: str, status: BatchStatus, model: str, custom_ids: Sequence[str]
    ) -> dict[str, LineResult]:
        found: dict[str, LineResult] = {}
        for error in status.errors:  # the file was refused: the lines it names, as invalid
            number = error.get("line")
            if isinstance(number, int) and 1 <= number <= len(custom_ids):
                what = f"batch line refused: {error.get('code')}: {error.get('message')}"
                found[custom_ids[number - 1]] = LineResult(error=self.failure(400, None, what))
        for file in (status.output_file, status.error_file):
            if file:
                url = endpoint_url(self._base, f"/files/{file}/content")
                for raw in (await self._send("GET", url)).splitlines():
                    self._read_line(raw, model, found)
        return found

    def _read_line(self, raw: bytes, model: str, found: dict[str, LineResult]) -> None:
        try:
            row = orjson.loads(raw)
            custom_id = str(row["custom_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            if raw.strip():
                log.warning("%s: a batch result line without a custom_id; skipped", self.name)
            return
        try:
            response, error = row.get("response"), row.get("error")
            if response:
                found[custom_id] = self.answer(
                    int(response["status_code"]), response.get("body"), model, raw
                )
            elif isinstance(error, dict) and error.get("code") == "batch_cancelled":
                found[custom_id] = LineResult(unanswered="cancelled")
            else:  # batch_expired, or an error without a response
                found[custom_id] = LineResult(unanswered="expired")
        except _SHAPE_ERRORS as exc:
            reason = f"malformed batch result ({type(exc).__name__})"
            found[custom_id] = LineResult(
                error=self.malformed(reason, raw), raw=raw[:_MAX_RAW_LINE]
            )

    async def cancel(self, batch: str) -> None:
        await self._send("POST", endpoint_url(self._base, f"/batches/{batch}/cancel"))

    async def find(self, submission: str, since_ms: int) -> str | None:
        """Look through the batch list (newest first) back to ``since_ms`` for the submission's
        metadata. None when not there, or when the server lists no batches (404, 405)."""
        after: str | None = None
        while True:
            query = {"limit": "100", **({"after": after} if after else {})}
            url = endpoint_url(self._base, "/batches").with_query(query)
            try:
                page = await self._json("GET", url)
            except ProviderError as exc:
                if exc.status_code in (404, 405):
                    return None
                raise
            rows = [row for row in page.get("data") or () if isinstance(row, dict)]
            for row in rows:
                if (row.get("metadata") or {}).get(METADATA_KEY) == submission:
                    return str(row["id"])
            oldest = min((int(row.get("created_at") or 0) for row in rows), default=0)
            if not page.get("has_more") or not rows or oldest * 1000 < since_ms - 3_600_000:
                return None
            after = str(rows[-1]["id"])


class AnthropicBatches(BatchAPI):
    """Anthropic's Message Batches (``base_url`` as ``ANTHROPIC_BASE_URL`` gives it)."""

    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024

    def custom_id(self, request_id: str) -> str:
        # Anthropic takes ^[a-zA-Z0-9_-]{1,64}$ only: other IDs go by a hash of themselves.
        if _CUSTOM_ID.match(request_id):
            return request_id
        return "id-" + hashlib.sha256(request_id.encode()).hexdigest()[:48]

    def _url(self, path: str = "") -> URL:
        # The Messages endpoint as the adapter builds it (a base URL ending in /v1 accepted).
        return URL(f"{self.adapter.endpoint(self._base)}/batches{path}")

    async def create(self, lines: Sequence[BatchLine], model: str, submission: str) -> str:
        requests = [{"custom_id": line.custom_id, "params": line.body} for line in lines]
        created = await self._json("POST", self._url(), json={"requests": requests})
        return str(created["id"])

    async def status(self, batch: str) -> BatchStatus:
        data = await self._json("GET", self._url(f"/{batch}"))
        status = str(data.get("processing_status"))
        return BatchStatus(status, status == "ended")

    async def results(
        self, batch: str, status: BatchStatus, model: str, custom_ids: Sequence[str]
    ) -> dict[str, LineResult]:
        found: dict[str, LineResult] = {}
        for raw in (await self._send("GET", self._url(f"/{batch}/results"))).splitlines():
            try:
                row = orjson.loads(raw)
                custom_id, result = str(row["custom_id"]), row["result"]
                kind = result["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                if raw.strip():
                    log.warning("%s: a batch result line without a custom_id; skipped", self.name)
                continue
            if kind == "succeeded":
                found[custom_id] = self.answer(200, result.get("message"), model, raw)
            elif kind == "errored":
                found[custom_id] = self._errored(result.get("error"), raw)
            else:  # expired, canceled
                found[custom_id] = LineResult(
                    unanswered="cancelled" if kind == "canceled" else "expired"
                )
        return found

    def _errored(self, body: object, raw: bytes) -> LineResult:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            reason = "malformed batch result (an errored line without its error)"
            return LineResult(error=self.malformed(reason, raw), raw=raw[:_MAX_RAW_LINE])
        status = self.adapter.error_statuses.get(str(error.get("type")), 500)
        return LineResult(error=self.failure(status, error, "batch line failed"))

    async def cancel(self, batch: str) -> None:
        await self._send("POST", self._url(f"/{batch}/cancel"))


def _error_object(body: bytes) -> object:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data.get("error") if isinstance(data, dict) else None


def batch_apis(
    settings: ProviderSettings, router: ProviderRouter, client: aiohttp.ClientSession
) -> Mapping[str, BatchAPI]:
    """The batch API of each configured provider that has one: the built-in ``openai`` and
    ``anthropic`` (OpenAI-compatible servers and other endpoints are served as standard)."""
    apis: dict[str, BatchAPI] = {}
    openai, anthropic = router.get("openai"), router.get("anthropic")
    if isinstance(openai, OpenAICompatible):
        apis["openai"] = OpenAIBatches(
            openai, client, settings.openai_base_url, settings.openai_api_key
        )
    if isinstance(anthropic, AnthropicMessages):
        apis["anthropic"] = AnthropicBatches(
            anthropic, client, settings.anthropic_base_url, settings.anthropic_api_key
        )
    return apis
