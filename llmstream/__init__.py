"""llmstream: a Kafka-native processor for LLM requests."""

__version__ = "0.1.0"
