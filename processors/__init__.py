"""The stream processor: the worker, dedup, retries, traffic control and provider adapters."""

if __name__ != "llmstream.processors":  # pragma: no cover - a packaging mistake, caught at import
    # The repository keeps this folder at its top level, but it installs as llmstream.processors:
    # importing it under its folder name would load a second copy of every module in it.
    raise ImportError(f"import llmstream.processors, not {__name__}")
