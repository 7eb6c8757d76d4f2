"""Request bodies as JSON, by the program's one text rule (mlx_mixtral.text) and the JSON grammar.

Bytes that are not UTF-8 and lone surrogates ("\\udce9") become U+FFFD, so no route, error message
or response ever holds text that cannot be encoded. What Python's json module accepts but JSON does
not (NaN, Infinity, -Infinity), a number that overflows a float (1e309 would become inf), an integer
past Python's int conversion limit and nesting deeper than the parser's recursion are refused with a
message saying which, as any other malformed body is: a 400 before validation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

from mlx_mixtral.text import clean_json, decode


def parse_json(data: bytes) -> Any:
    text = decode(data)

    def refuse(what: str) -> json.JSONDecodeError:
        return json.JSONDecodeError(what, text, 0)

    def constant(name: str) -> Any:
        raise refuse(f"{name} is not a JSON number")

    def number(literal: str) -> float:
        value = float(literal)
        if value in (float("inf"), float("-inf")):
            raise refuse(f"{literal} is outside the range of a double")
        return value

    def integer(literal: str) -> int:
        try:
            return int(literal)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise refuse(f"an integer of {len(literal)} digits is too long") from None

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number, parse_int=integer)
    except RecursionError:
        raise refuse("the JSON is nested too deeply") from None
    return clean_json(value)


class _JSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONBodyRoute(APIRoute):
    """A route whose JSON body is parsed by `parse_json` (set as the app router's route_class)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            return await handler(_JSONRequest(request.scope, request.receive))

        return route
