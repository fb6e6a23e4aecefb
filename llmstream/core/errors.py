"""The project's root exception.

Every error llmstream raises on purpose derives from :class:`LLMStreamError`::

    LLMStreamError
     ├── core.connections.KafkaSetupError    the Kafka cluster refuses what the settings insist on
     ├── core.record.ClaimUnavailable        Redis cannot be reached, or this worker's lease lapsed:
     │                                       fail closed
     ├── core.sessions.SessionError          a session refuses a turn (another client's, too large)
     │   (SessionOwnerMismatch, SessionTurnTooLarge)
     ├── core.tools.ToolsFileError           LLMSTREAM_TOOLS_FILE cannot be read (also a ValueError)
     ├── core.tools.UnknownTool              a request names a server tool nobody registered
     ├── processors.providers.ProviderError  a provider call failed (carries status, retryable,
     │   │                                   retry_after)
     │   ├── processors.providers.http.CapacityUnavailable  a 429 saying the tier asked for
     │   │                                   (flex) has no capacity now
     │   └── processors.retry.RetriesExhausted  no more attempts (max attempts, or the deadline)
     ├── processors.tool_loop.ToolStepsExhausted  the model kept calling server tools past
     │                                       LLMSTREAM_MAX_TOOL_STEPS
     ├── ingress.errors.ApiError             an HTTP answer other than success (status, OpenAI
     │                                       error body, headers such as Retry-After)
     ├── replay.ReplayError                  a replay that cannot run as asked
     └── devtools.processes.ServiceStartError an embedded broker or Redis did not come up

(Module paths are under ``llmstream.``.) The event contract is the one exception:
``llmstream.schemas.DecodeError`` derives from ``ValueError``, because the contract imports
nothing else from llmstream and can be used on its own by producers.
"""


class LLMStreamError(Exception):
    """Base class of every error llmstream raises on purpose."""
