"""Reading the current MCP session from host code (Starlette/FastAPI ``Request``, Django
``HttpRequest`` under ASGI, or a raw ASGI scope)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp2anp_middleware.sessions.middleware import SESSION_SCOPE_KEY
from mcp2anp_middleware.sessions.state import SERVING, SessionState


def current_session() -> SessionState | None:
    """The session of the MCP request being served in this task (a tool's session, from
    inside the tool), or None outside one. Set by the middleware for the app's whole run, so it
    holds in every task the request starts too, even after the request ended (check
    ``closed`` in such a task)."""
    return SERVING.get()()


def session_from_scope(scope: Mapping[str, Any]) -> SessionState | None:
    """The :class:`SessionState` the middleware attached to this ASGI scope, if any."""
    state = scope.get("state")
    if not isinstance(state, Mapping):
        return None
    session = state.get(SESSION_SCOPE_KEY)
    return session if isinstance(session, SessionState) else None


def session_from_request(request: Any) -> SessionState | None:
    """Works with any request object that exposes its ASGI ``scope`` (Starlette, FastAPI and
    Django's ``ASGIRequest`` all do); None outside the middleware's prefix."""
    scope = getattr(request, "scope", None)
    return session_from_scope(scope) if isinstance(scope, Mapping) else None
