"""Session statistics as JSON: a small ASGI app of its own, routed by the middleware at
``stats_path`` when one is set (and read by the Prometheus collector through
:func:`session_statistics`)."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from mcp2anp_middleware.authentication.base import credentials_from_headers
from mcp2anp_middleware.sessions.jsonrpc_errors import UNAUTHORIZED, send_jsonrpc_error
from mcp2anp_middleware.sessions.registry import SessionRegistry


async def session_statistics(registry: SessionRegistry, *, started_at: float) -> dict[str, Any]:
    """Counters and gauges for monitoring: counts only, never ids or principals."""
    now = registry.clock()
    try:
        active: int | None = await registry.store.count(now=now)
        healthy = await registry.store.ping()
    except Exception:
        active, healthy = None, False
    return {
        "active_sessions": active,
        "local_sessions": len(registry),
        "in_flight_requests": registry.in_flight,
        "accepting_sessions": registry.accepting,
        "store": {"type": type(registry.store).__name__, "healthy": healthy},
        "uptime_seconds": round(time.time() - started_at, 3),
        **registry.stats.as_dict(),
    }


class SessionStatsApp:
    """``GET`` the statistics; with a ``token``, only with ``Authorization: Bearer <token>``."""

    def __init__(self, registry: SessionRegistry, *, token: str | None = None) -> None:
        if token == "":  # (an unset variable, most likely): it would let everyone in
            raise ValueError("the statistics token is empty; pass None to serve them openly")
        self.registry = registry
        self._token = None if token is None else token.encode()
        self.started_at = time.time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._token is not None:
            supplied = (credentials_from_headers(scope["headers"]).bearer_token or "").encode()
            if not hmac.compare_digest(supplied, self._token):
                await send_jsonrpc_error(send, 401, UNAUTHORIZED, "Statistics need a valid token")
                return
        payload = await session_statistics(self.registry, started_at=self.started_at)
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
