"""Views of the example Django project (async: they run on the server's event loop)."""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse  # type: ignore[import-untyped]

from mcp2anp_middleware import session_from_request


async def home(request: Any) -> Any:
    return JsonResponse({"host": "django", "mcp": "/mcp", "agent": "/agent"})


async def whoami(request: Any) -> Any:
    # Django's ASGIRequest keeps the ASGI scope, so the helper works; outside /mcp it is None.
    session = session_from_request(request)
    return JsonResponse(
        {
            "session": session.session_id[:8] if session is not None else None,
            "asgi_scope": request.scope["type"],
        }
    )
