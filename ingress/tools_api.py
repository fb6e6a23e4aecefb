"""``POST /v1/tools/{name}/execute``: run one registered server-side tool, for debugging.

The body is the arguments object, as a model would write it; the answer is the
:class:`~llmstream.core.tools.ToolResult` the model would read: a failing tool (bad arguments,
an HTTP error, a timeout) is a ``200`` whose ``status`` is ``error``. Only tools registered in
``LLMSTREAM_TOOLS_FILE`` can be run, at their configured URLs.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Body, Depends, Path, Request

from llmstream.core.tools import ToolExecutor, ToolResult
from llmstream.ingress.auth import CallerDep
from llmstream.ingress.errors import ApiError
from llmstream.ingress.parts import Routes, part
from llmstream.ingress.requests_api import ERROR_RESPONSES, JSON_BODY_RESPONSES
from llmstream.schemas.models import MAX_TOOL_NAME_CHARS


def _tools(request: Request) -> ToolExecutor:
    return part(request, "tools", ToolExecutor)


ToolsDep = Annotated[ToolExecutor, Depends(_tools)]

routes = Routes(tags=["tools"])


@routes.post(
    "/v1/tools/{name}/execute",
    response_model=ToolResult,
    responses={
        404: {"description": "No tool registered under this name"},
        **ERROR_RESPONSES,
        **JSON_BODY_RESPONSES,
    },
)
async def execute_tool(
    name: Annotated[
        str, Path(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=r"^[a-zA-Z0-9_-]+$")
    ],
    arguments: Annotated[dict[str, Any], Body(description="The tool's arguments object")],
    identity: CallerDep,
    tools: ToolsDep,
) -> ToolResult:
    """Call the registered tool ``name`` with the arguments object, as the worker would."""
    del identity  # authenticated and counted like every /v1 call
    if name not in tools.registry:
        raise ApiError(404, "no tool registered under this name", param="name", code="not_found")
    # json, not orjson: the body may hold what orjson cannot write (an integer over 64 bits);
    # what the tool's schema refuses comes back as an error result.
    return await tools.execute(name, json.dumps(arguments))
