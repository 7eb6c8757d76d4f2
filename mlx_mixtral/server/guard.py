"""What runs before routing: the Host check, the API key and the body-size cap.

A page on another site cannot reach a loopback server through DNS rebinding (its Host header names
that site), a key is compared in constant time, and at most `max_body_bytes` of a body are read.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from mlx_mixtral.server.protocol import APIError

if TYPE_CHECKING:
    from mlx_mixtral.server.app import Settings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    """OpenAI's error object as a response."""
    return JSONResponse(APIError(status, message, **kwargs).body(), status_code=status)


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware run before routing: Host check (a page on another site cannot reach a
    loopback server through DNS rebinding), API key, and the body-size cap (the body is read here,
    at most max_body_bytes of it, and replayed to the app)."""

    def __init__(self, app: Any, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, s = Headers(scope=scope), self.settings
        if s.allowed_hosts is not None and _host_name(headers.get("host", "")) not in s.allowed_hosts:
            return await error_response(
                400, f"Host header {headers.get('host', '')!r} is not one this server answers to", code="invalid_host"
            )(scope, receive, send)
        if s.api_key is not None and scope["path"].startswith("/v1/") and not _authorized(headers, s.api_key):
            response = error_response(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(
            413,
            f"request body is larger than this server's limit of {s.max_body_bytes} bytes",
            code="request_too_large",
        )
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > s.max_body_bytes):
            return await too_big(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > s.max_body_bytes:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the real stream, so a disconnect is still seen

        await self.app(scope, replay, send)


def _authorized(headers: Headers, key: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())
