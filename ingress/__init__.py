"""The HTTP ingress: publishes LLM requests to Kafka and serves their outcomes.

``create_app(IngressSettings())`` builds the ASGI app; ``llmstream ingress`` serves it.
"""

from ingress.app import create_app
from ingress.settings import IngressSettings

__all__ = ["IngressSettings", "create_app"]
