"""A chat request's tools, tool_choice and response_format -> the structured-output options of
`stream_generate` (checked by `options.generation_options`, so a bad schema is a 400 naming it)."""

from __future__ import annotations

from typing import Any

from mlx_mixtral.errors import SchemaError
from mlx_mixtral.grammar import check_structured
from mlx_mixtral.server.protocol import APIError
from mlx_mixtral.server.schema import ChatCompletionRequest


def structured_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """json_schema, tools, tool_choice and parallel_tool_calls, checked, as generation_options takes
    them; a 400 naming the field when the engine cannot enforce them (or a named tool is unknown)."""
    schema = None
    if req.response_format is not None and req.response_format.type == "json_object":
        schema = {"type": "object"}
    elif req.response_format is not None and req.response_format.type == "json_schema":
        given = req.response_format.json_schema
        if given is None or given.schema_ is None:
            raise APIError(
                400,
                'response_format of type "json_schema" needs json_schema.schema',
                param="response_format.json_schema",
                code="invalid_value",
            )
        schema = given.schema_
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return check_structured(
            json_schema=schema, tools=tools, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls
        )
    except SchemaError as e:
        param = "response_format.json_schema.schema" if e.option == "json_schema" else e.option
        raise APIError(400, str(e), param=param, code="invalid_value") from None
