"""The models one request tries, in order: its own, then its fallbacks (see
:mod:`processors.traffic`, step 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmstream.schemas.models import LLMRequest

__all__ = ["candidates"]


def candidates(
    request: LLMRequest, primary: str, configured: Mapping[str, Sequence[str]]
) -> list[tuple[LLMRequest, str]]:
    """The request for each model to try, with the model's name, ``primary`` (its own model as
    ``provider/model``) first: then the request's ``fallbacks``, or else those ``configured``
    (``LLMSTREAM_FALLBACKS``) for its model; each model once."""
    names = list(request.fallbacks) or list(
        configured.get(request.model) or configured.get(primary) or ()
    )
    result = [(request, primary)]
    if not names:
        return result
    seen = {primary, request.model}
    for name in names:
        if name not in seen:
            seen.add(name)
            result.append((request.model_copy(update={"model": name, "provider": None}), name))
    return result
