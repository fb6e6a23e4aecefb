"""The event contract: Avro schemas (the source of truth), pydantic models and the one codec."""

from schemas.codec import (
    DecodeError,
    WireFormat,
    decode,
    decode_request,
    detect_format,
    encode,
    fingerprint_for,
    schema_for,
)
from schemas.models import ChatMessage, LLMError, LLMMetric, LLMRequest, LLMResponse

__all__ = [
    "ChatMessage",
    "DecodeError",
    "LLMError",
    "LLMMetric",
    "LLMRequest",
    "LLMResponse",
    "WireFormat",
    "decode",
    "decode_request",
    "detect_format",
    "encode",
    "fingerprint_for",
    "schema_for",
]
