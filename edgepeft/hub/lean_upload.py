"""The upload route answered ahead of FastAPI's per-request layers: the hub's hot path as a plain ASGI middleware.

Inside the app's outer middleware (server errors, telemetry, body limits) FastAPI runs its exception and exit-stack
middleware, matches the path against every route and wraps the endpoint; skipping those, the event loop spends
0.44 -> 0.25 ms of CPU per upload (benchmarks/hub_profile.py: results/hub_profile_s5.json, hub_profile.json). This
middleware answers ``POST /api/v1/devices/{device_id}/deltas`` with the very handler the FastAPI route calls
(``api_device.upload_delta``), turns what it raises into a response with the app's own exception handlers (the same
status, body and headers as the route), and passes every other request on. The route stays registered, so the
OpenAPI document is unchanged; an error no handler takes reaches Starlette's 500 as it would from the route.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from edgepeft.hub import api_device

UPLOAD_PATH: re.Pattern[str] = compile_path(api_device.router.prefix + api_device.UPLOAD_PATH)[0]

Handler = Callable[[Request, Exception], Awaitable[Response]]


class LeanUpload:
    """ASGI middleware: uploads go straight to ``api_device.upload_delta``, everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = UPLOAD_PATH.match(_route_path(scope)) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await api_device.upload_delta(match["device_id"], request)
        except Exception as exc:
            handler = _handler_for(scope["app"], exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app's routes match: without the ``root_path`` a proxy mounts the app under (as Starlette strips it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _handler_for(app: Any, exc: Exception) -> Handler | None:
    """The app's exception handler for ``exc``: the one for its nearest class, as Starlette's ExceptionMiddleware picks."""
    handlers = app.exception_handlers
    return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
