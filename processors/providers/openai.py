"""The OpenAI Chat Completions wire format: OpenAI itself, OpenRouter, Ollama, vLLM and the like.

``POST {base_url}/chat/completions`` with ``base_url`` given the way ``OPENAI_BASE_URL`` is
(``https://api.openai.com/v1``). Errors arrive as ``{"error": {"message", "type", "param",
"code"}}``; OpenRouter puts the HTTP status in ``code``.

Streamed (``"stream": true`` with ``stream_options.include_usage``): ``data:`` lines, each a
``chat.completion.chunk`` whose ``choices[0].delta.content`` is the next text and whose last
choice carries ``finish_reason``; then a chunk with empty ``choices`` and the ``usage``; then
``data: [DONE]``. An ``{"error": ...}`` object in a data line is the provider failing mid-stream
(OpenRouter sends its HTTP status as the ``code``).

A request whose ``service_tier`` is ``"flex"`` is sent with ``"service_tier": "flex"`` (OpenAI's
flex processing: batch prices, slower, and a 429 ``resource_unavailable`` when flex is short,
raised as :class:`~.http.CapacityUnavailable`); any other tier is sent without it (the default).

Function calling is sent as OpenAI documents it: ``tools``, and with them ``tool_choice`` and
``parallel_tool_calls`` (the API refuses either without tools: a request that offers only server
tools has them added as ``tools`` by the worker first); ``response_format``; assistant messages
with ``tool_calls`` (``content`` may be null) and ``tool`` messages with ``tool_call_id``. An
answer's ``message.tool_calls`` become the completion's, its ``finish_reason`` as given
(``"tool_calls"``). Streamed, each call comes as ``delta.tool_calls`` fragments by ``index``: the
first names its ``id`` and ``function.name`` (kept as first given), each brings a piece of
``function.arguments`` (joined); the chunks carry text only, the calls arrive whole at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from yarl import URL

from llmstream.processors.providers import Completion
from llmstream.processors.providers.http import (
    MAX_TOKEN_COUNT,
    ErrorFields,
    HTTPAdapter,
    StreamedAnswer,
    endpoint_url,
    present,
    text_field,
    token_count,
)
from llmstream.processors.providers.sse import ServerSentEvent
from llmstream.processors.providers.toolcalls import PartialCall, tool_calls
from llmstream.schemas.models import ChatMessage, LLMRequest

__all__ = ["OpenAICompatible"]


class OpenAICompatible(HTTPAdapter):
    """An adapter for any endpoint that speaks OpenAI's Chat Completions API."""

    # OpenAI's documented error.type / error.code values for an exhausted quota or budget.
    quota_codes = frozenset(
        {
            "insufficient_quota",
            "credit_balance_exhausted",
            "organization_usage_limit_exceeded",
            "organization_spend_limit_exceeded",
            "project_spend_limit_exceeded",
            "billing_hard_limit_reached",
        }
    )
    # Flex is short of capacity: the same call without "service_tier" would be served.
    capacity_codes = frozenset({"resource_unavailable"})
    offers_flex = True
    success_shape = "choices[0].message"
    error_statuses: ClassVar[Mapping[str, int]] = {
        "invalid_request_error": 400,
        "authentication_error": 401,
        "permission_error": 403,
        "not_found_error": 404,
        "rate_limit_error": 429,
        "insufficient_quota": 429,
        "server_error": 500,
    }

    def endpoint(self, base_url: str) -> URL:
        return endpoint_url(base_url, "/chat/completions")

    def wire_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def request_body(self, request: LLMRequest, model: str) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": [_message(m) for m in request.messages],
            **present(
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                top_p=request.top_p,
                stop=request.stop or None,
            ),
        }
        if request.service_tier == "flex":
            body["service_tier"] = "flex"
        if request.tools:
            body["tools"] = [t.model_dump(mode="json", exclude_none=True) for t in request.tools]
            choice = request.tool_choice
            body.update(
                present(
                    tool_choice=choice if isinstance(choice, str | None) else choice.model_dump(),
                    parallel_tool_calls=request.parallel_tool_calls,
                )
            )
        if request.response_format is not None:
            body["response_format"] = request.response_format.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        return body

    def parse_completion(self, data: Any, requested_model: str) -> Completion:
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage")
        if not isinstance(usage, dict):
            usage = {}  # usage is bookkeeping: without it the answer still counts
        prompt = token_count(self.name, "prompt_tokens", usage.get("prompt_tokens"))
        completion = token_count(self.name, "completion_tokens", usage.get("completion_tokens"))
        total = token_count(self.name, "total_tokens", usage.get("total_tokens"))
        finish_reason = choice.get("finish_reason")
        calls = message.get("tool_calls") or ()
        return Completion(
            content=str(message.get("content") or ""),
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total or min(prompt + completion, MAX_TOKEN_COUNT),
            provider=self.name,
            model=str(data.get("model") or requested_model),
            tool_calls=tool_calls(_wire_call(call) for call in calls),
        )

    def error_fields(self, error: Mapping[str, Any]) -> ErrorFields:
        return ErrorFields(
            kind=text_field(error.get("type")),
            code=text_field(error.get("code")),
            message=text_field(error.get("message")),
        )

    def stream_fields(self) -> dict[str, Any]:
        return {"stream": True, "stream_options": {"include_usage": True}}

    def read_event(self, event: ServerSentEvent, answer: StreamedAnswer) -> str:
        if event.data.startswith("[DONE]"):
            answer.done = True
            return ""
        data = orjson.loads(event.data)
        error = data.get("error")
        if error:
            raise self.stream_error(error, event.data)
        if data.get("model"):
            answer.model = str(data["model"])
        usage = data.get("usage")
        if isinstance(usage, dict):  # the last chunk's, with include_usage
            answer.prompt_tokens = token_count(
                self.name, "prompt_tokens", usage.get("prompt_tokens")
            )
            answer.completion_tokens = token_count(
                self.name, "completion_tokens", usage.get("completion_tokens")
            )
            answer.total_tokens = token_count(self.name, "total_tokens", usage.get("total_tokens"))
        text = ""
        for choice in data.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n is never sent: only one choice is asked for
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                text = content
            for fragment in delta.get("tool_calls") or ():
                _add_fragment(answer.calls, fragment)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str):
                answer.finish_reason = finish_reason
        return text


def _message(m: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name is not None:
        item["name"] = m.name
    if m.tool_calls:
        item["tool_calls"] = [call.model_dump(mode="json") for call in m.tool_calls]
    if m.tool_call_id is not None:
        item["tool_call_id"] = m.tool_call_id
    return item


def _wire_call(call: Any) -> tuple[object, object, object]:
    """``(id, name, arguments)`` of one of ``message.tool_calls``; a call of another type than
    ``function`` (none is ever offered) has no function here, and so is malformed."""
    function = call["function"] if call.get("type", "function") == "function" else {}
    return call.get("id"), function.get("name"), function.get("arguments")


def _add_fragment(calls: dict[int, PartialCall], fragment: Any) -> None:
    """One ``delta.tool_calls`` fragment into the call at its ``index``."""
    call = calls.setdefault(int(fragment["index"]), PartialCall())
    function = fragment.get("function") or {}
    # The ID and name arrive whole in a call's first fragment; some servers repeat them.
    call_id, name = fragment.get("id"), function.get("name")
    if not call.id and isinstance(call_id, str):
        call.id = call_id
    if not call.name and isinstance(name, str):
        call.name = name
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        call.pieces.append(arguments)
