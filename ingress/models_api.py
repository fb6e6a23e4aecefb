"""``GET /v1/models``: the ``provider/model`` names configuration knows, in OpenAI's list shape.

The names come from :class:`~llmstream.core.catalog.Catalog` (the price table, fallbacks, rate
limits, endpoints' model lists). A name not listed may still be served: a request names any
``provider/model`` a configured provider accepts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path, Request
from pydantic import BaseModel

from llmstream.core.catalog import Catalog, KnownModel
from llmstream.ingress.auth import CallerDep
from llmstream.ingress.errors import ApiError
from llmstream.ingress.parts import Routes, part
from llmstream.ingress.requests_api import ERROR_RESPONSES


class Model(BaseModel):
    """One model, as OpenAI's ``GET /v1/models`` shows it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str

    @classmethod
    def of(cls, model: KnownModel, created: int) -> Model:
        return cls(id=model.id, created=created, owned_by=model.provider)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


routes = Routes(tags=["openai"])


@routes.get("/v1/models", response_model=ModelList, responses={**ERROR_RESPONSES})
async def list_models(request: Request, identity: CallerDep) -> ModelList:
    """Every ``provider/model`` name the configuration holds."""
    del identity  # authenticated and counted like every /v1 call
    catalog = part(request, "catalog", Catalog)
    return ModelList(data=[Model.of(m, catalog.created) for m in catalog.models])


@routes.get(
    "/v1/models/{model:path}",
    response_model=Model,
    responses={404: {"description": "Not a model configuration names"}, **ERROR_RESPONSES},
)
async def get_model(
    request: Request,
    model: Annotated[str, Path(min_length=1, max_length=256)],
    identity: CallerDep,
) -> Model:
    """One model of the list; 404 for a name configuration does not hold."""
    del identity
    catalog = part(request, "catalog", Catalog)
    for known in catalog.models:
        if known.id == model:
            return Model.of(known, catalog.created)
    raise ApiError(404, f"model {model[:256]!r} is not configured", param="model", code="not_found")
