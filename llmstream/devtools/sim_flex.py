"""OpenAI's flex processing tier in the provider simulator.

A Chat Completions call with ``"service_tier": "flex"`` is answered as any other call is, and its
answer says ``"service_tier": "flex"``; or, when flex is short of capacity, it gets a 429 whose
error code is ``resource_unavailable`` (nothing is billed for it). Flex is short for
``flex_busy_rate`` of flex calls, and for the flex calls of a request whose last user message holds
``[flex-busy]`` (every one) or ``[flex-busy:N]`` (its first N). A request is its
``X-Client-Request-Id``, else its exact body.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import orjson

from llmstream.devtools.wire import check_openai, last_user_text

__all__ = ["FlexTier", "flex_busy_body"]

_BUSY_MARKER = re.compile(r"\[flex-busy(?::(\d{1,6}))?\]")


class FlexTier:
    """Which flex calls find no capacity, and how many flex calls each request made."""

    def __init__(self, rate: Callable[[], float], chance: Callable[[], float]) -> None:
        self.rate = rate
        self.chance = chance
        self.reset()

    def reset(self) -> None:
        self.calls_by_request_id: dict[str, int] = {}
        self.busy_total = 0

    def stats(self) -> dict[str, Any]:
        return {
            "flex_calls_by_request_id": self.calls_by_request_id,
            "flex_busy_total": self.busy_total,
        }

    def busy(self, raw: bytes, request_id: str) -> bool:
        """Whether this Chat Completions call asks for flex and finds no capacity (it is counted
        when it asks for flex)."""
        if b"flex" not in raw:  # the cheap test first: most calls are not flex calls
            return False
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(body, dict) or body.get("service_tier") != "flex" or check_openai(body):
            return False
        key = request_id or "body:" + hashlib.sha256(raw).hexdigest()
        earlier = self.calls_by_request_id.get(key, 0)
        self.calls_by_request_id[key] = earlier + 1
        marker = _BUSY_MARKER.search(last_user_text("openai", body))
        if marker is not None:
            busy = marker.group(1) is None or earlier < int(marker.group(1))
        else:
            rate = self.rate()
            busy = bool(rate) and self.chance() < rate
        self.busy_total += busy
        return busy


def flex_busy_body() -> dict[str, Any]:
    """The 429 that tells a flex call there is no capacity for it now."""
    return {
        "error": {
            "message": (
                "Resource unavailable: flex processing has no capacity for this request right "
                "now. Retry later, or send the request with the default service tier."
            ),
            "type": "server_error",
            "param": None,
            "code": "resource_unavailable",
        }
    }
