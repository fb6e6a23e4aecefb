"""The project's root exception.

Every error llmstream raises on purpose derives from :class:`LLMStreamError`::

    LLMStreamError
     ├── schemas.codec.DecodeError          an event that cannot be decoded or validated
     ├── processors.providers.ProviderError a provider call failed (carries status, retryable,
     │                                      retry_after)
     ├── processors.dedup.ClaimUnavailable  Redis cannot be reached: fail closed
     ├── ingress.errors.ApiError            an HTTP answer other than success (status, OpenAI
     │                                      error body, headers such as Retry-After)
     └── llmstream.embedded.ServiceStartError an embedded broker or Redis did not come up
"""


class LLMStreamError(Exception):
    """Base class of every error llmstream raises on purpose."""
