"""The provider simulator's streamed answers: Server-Sent Events as OpenAI and Anthropic write them.

OpenAI (``chat.completion.chunk``)::

    data: {... "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, ...}]}
    data: {... "delta": {"content": "<piece>"} ...}              one per piece
    data: {... "delta": {}, "finish_reason": "stop"}
    data: {... "choices": [], "usage": {...}}                    with stream_options.include_usage
    data: [DONE]

Tool calls: the first chunk of each call carries its ``index``, ``id``, ``type`` and ``name`` with
empty ``arguments``; the argument JSON text follows in pieces, then ``finish_reason``
``tool_calls``.

Anthropic: ``message_start``, then per content block ``content_block_start`` (a ``text`` block, or
a ``tool_use`` block with ``input: {}``), ``ping`` after the first, ``content_block_delta``
(``text_delta`` or ``input_json_delta``) per piece, ``content_block_stop``; then
``message_delta`` (``stop_reason``, ``usage.output_tokens``) and ``message_stop``.

Text and each call's arguments are cut into a given number of pieces (fewer when shorter):
joined, they are exactly the non-streamed answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from llmstream.devtools.wire import Reply, anthropic_envelope, openai_id, openai_usage

__all__ = ["Frame", "anthropic_frames", "break_point", "openai_frames", "split", "write_frames"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One server-sent event, encoded; ``piece`` when it carries part of the answer."""

    data: bytes
    piece: bool = False


def split(text: str, pieces: int) -> list[str]:
    """``text`` in at most ``pieces`` consecutive parts of nearly equal length."""
    if not text:
        return []
    count = max(1, min(pieces, len(text)))
    size, extra = divmod(len(text), count)
    parts, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        parts.append(text[start:end])
        start = end
    return parts


def openai_frames(body: dict[str, Any], reply: Reply, number: int, pieces: int) -> list[Frame]:
    """A Chat Completions stream of ``reply``."""
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    head: dict[str, Any] = {
        "id": openai_id(number),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "flex" if body.get("service_tier") == "flex" else "default",
        "system_fingerprint": "fp_simulator",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, piece: bool = False) -> Frame:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        event = {**head, "choices": [choice]}
        if with_usage:
            event["usage"] = None
        return Frame(_data(event), piece)

    frames: list[Frame] = []
    if reply.tool_uses:
        for index, call in enumerate(reply.tool_uses):
            start: dict[str, Any] = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            if index == 0:
                first = {"role": "assistant", "content": None, "tool_calls": [start]}
                frames.append(chunk({**first, "refusal": None}))
            else:
                frames.append(chunk({"tool_calls": [start]}))
            for part in split(call.arguments_json, pieces):
                fragment = {"index": index, "function": {"arguments": part}}
                frames.append(chunk({"tool_calls": [fragment]}, piece=True))
    else:
        frames.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        frames.extend(chunk({"content": part}, piece=True) for part in split(reply.text, pieces))
    frames.append(chunk({}, reply.openai_finish))
    if with_usage:
        frames.append(Frame(_data({**head, "choices": [], "usage": openai_usage(reply)})))
    frames.append(Frame(b"data: [DONE]\n\n"))
    return frames


def anthropic_frames(body: dict[str, Any], reply: Reply, number: int, pieces: int) -> list[Frame]:
    """A Messages API stream of ``reply``."""
    message = anthropic_envelope(body, number, reply)
    message["usage"] = {**message["usage"], "output_tokens": 1}  # as the API starts a stream
    frames = [_event("message_start", {"type": "message_start", "message": message})]
    blocks: list[tuple[dict[str, Any], str, list[str]]] = [
        (
            {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
            "input_json_delta",
            split(call.arguments_json, pieces),
        )
        for call in reply.tool_uses
    ] or [({"type": "text", "text": ""}, "text_delta", split(reply.text, pieces))]
    for index, (block, kind, parts) in enumerate(blocks):
        start = {"type": "content_block_start", "index": index, "content_block": block}
        frames.append(_event("content_block_start", start))
        if index == 0:
            frames.append(_event("ping", {"type": "ping"}))
        field = "text" if kind == "text_delta" else "partial_json"
        frames.extend(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": kind, field: part},
                },
                piece=True,
            )
            for part in parts
        )
        frames.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    ended = {"stop_reason": reply.anthropic_stop, "stop_sequence": reply.stop_sequence or None}
    frames.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": ended,
                "usage": {"output_tokens": reply.completion_tokens},
            },
        )
    )
    frames.append(_event("message_stop", {"type": "message_stop"}))
    return frames


def break_point(frames: Sequence[Frame]) -> int:
    """How many frames a stream broken half-way sends: those before the second half of the
    pieces (at least the first frame), never the terminating event."""
    positions = [i for i, frame in enumerate(frames) if frame.piece]
    if not positions:
        return 1
    return max(1, positions[len(positions) // 2])


async def write_frames(
    response: web.StreamResponse, frames: Sequence[Frame], delay_s: float
) -> None:
    """Write ``frames``, waiting ``delay_s`` between two pieces of the answer."""
    pieces = 0
    for frame in frames:
        if frame.piece:
            if pieces and delay_s:
                await asyncio.sleep(delay_s)
            pieces += 1
        await response.write(frame.data)


def _data(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _event(name: str, event: dict[str, Any], *, piece: bool = False) -> Frame:
    return Frame(b"event: " + name.encode() + b"\n" + _data(event), piece)
