"""Session administration over HTTP: list a principal's sessions, revoke them ("log out
everywhere"). A small ASGI app of its own; the middleware routes ``admin_path`` to it.

- ``GET {admin_path}/sessions[?principal=P]``: ``{"sessions": [...]}``, each with its principal,
  times and short id, never a whole session id (without ``principal``: every session, up to
  :data:`LIST_LIMIT`).
- ``DELETE {admin_path}/sessions?principal=P[&id=SHORT]``: revoke all of P's sessions, or the one
  whose short id is SHORT; ``{"revoked": n}``. A revoked session gets 404 on every worker at its
  next request.

Every request needs ``Authorization: Bearer <token>`` (401 otherwise, compared in constant time).
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from mcp2anp_middleware.authentication.base import credentials_from_headers
from mcp2anp_middleware.sessions.jsonrpc_errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    UNAUTHORIZED,
    send_jsonrpc_error,
)
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores.base import StoreUnavailable

LIST_LIMIT = 1000


class SessionAdminApp:
    def __init__(self, registry: SessionRegistry, *, token: str, path: str = "/mcp-admin") -> None:
        if not token:
            raise ValueError("the admin API needs a token")
        self.registry = registry
        self.path = path.rstrip("/")
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        supplied = (credentials_from_headers(scope["headers"]).bearer_token or "").encode()
        if not hmac.compare_digest(supplied, self._token):
            headers = [(b"www-authenticate", b'Bearer realm="mcp-admin"')]
            await send_jsonrpc_error(
                send, 401, UNAUTHORIZED, "The admin API needs its token", headers=headers
            )
            return
        if scope["path"] != f"{self.path}/sessions":
            await send_jsonrpc_error(send, 404, INVALID_REQUEST, "No such admin resource")
            return
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = {k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
        if any(not query[name] for name in ("principal", "id") if name in query):
            # An empty value must never widen the request ("id=" revoking all, "principal="
            # listing everyone's).
            await send_jsonrpc_error(send, 400, INVALID_REQUEST, "Empty principal or id")
            return
        try:
            await self._answer(scope["method"], query, send)
        except StoreUnavailable:
            headers = [(b"retry-after", b"5")]
            message = "Session store unavailable; retry shortly"
            await send_jsonrpc_error(send, 503, INTERNAL_ERROR, message, headers=headers)

    async def _answer(self, method: str, query: dict[str, str], send: Send) -> None:
        principal = query.get("principal")
        if method == "GET":
            sessions = await self.registry.sessions_of(principal, limit=LIST_LIMIT)
            await _json(send, {"sessions": [info.as_dict() for info in sessions]})
        elif method == "DELETE" and principal:
            if "id" in query:
                revoked = await self.registry.revoke_short(principal, query["id"])
            else:
                revoked = await self.registry.revoke_principal(principal)
            await _json(send, {"revoked": revoked})
        elif method == "DELETE":
            await send_jsonrpc_error(send, 400, INVALID_REQUEST, "DELETE needs ?principal=")
        else:
            headers = [(b"allow", b"GET, DELETE")]
            await send_jsonrpc_error(
                send, 405, INVALID_REQUEST, "Use GET or DELETE", headers=headers
            )


async def _json(send: Send, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
