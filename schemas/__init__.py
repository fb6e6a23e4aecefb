"""The event contract: Avro schemas (the source of truth), pydantic models and the one codec."""

from llmstream.schemas.codec import (
    DecodeError,
    WireFormat,
    decode,
    decode_request,
    detect_format,
    encode,
    fingerprint_for,
    schema_for,
)
from llmstream.schemas.models import (
    ChatMessage,
    FunctionCall,
    JsonSchemaFormat,
    LLMError,
    LLMMetric,
    LLMRequest,
    LLMResponse,
    LLMResponseChunk,
    NamedFunction,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoiceFunction,
    ToolFunction,
    ToolStep,
)

__all__ = [
    "ChatMessage",
    "DecodeError",
    "FunctionCall",
    "JsonSchemaFormat",
    "LLMError",
    "LLMMetric",
    "LLMRequest",
    "LLMResponse",
    "LLMResponseChunk",
    "NamedFunction",
    "ResponseFormat",
    "Tool",
    "ToolCall",
    "ToolChoiceFunction",
    "ToolFunction",
    "ToolStep",
    "WireFormat",
    "decode",
    "decode_request",
    "detect_format",
    "encode",
    "fingerprint_for",
    "schema_for",
]

if __name__ != "llmstream.schemas":  # pragma: no cover - a packaging mistake, caught at import
    # The repository keeps this folder at its top level, but it installs as llmstream.schemas:
    # importing it under its folder name would load a second copy of every module in it.
    raise ImportError(f"import llmstream.schemas, not {__name__}")
