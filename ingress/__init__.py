"""The HTTP ingress: publishes LLM requests to Kafka and serves their outcomes.

``create_app(IngressSettings())`` builds the ASGI app; ``llmstream ingress`` serves it.
"""

from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings

__all__ = ["IngressSettings", "create_app"]

if __name__ != "llmstream.ingress":  # pragma: no cover - a packaging mistake, caught at import
    # The repository keeps this folder at its top level, but it installs as llmstream.ingress:
    # importing it under its folder name would load a second copy of every module in it.
    raise ImportError(f"import llmstream.ingress, not {__name__}")
