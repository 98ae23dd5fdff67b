"""The official SDK's MCP server, run stateless behind this package's session layer.

The SDK runs with ``stateless_http=True`` so the middleware is the only owner of
``Mcp-Session-Id`` (two session layers would mint two competing ids). Its session manager is run
as a middleware service (inside our lifespan handling or on first request) because a mounted
sub-app's own lifespan is never run by Starlette's ``Mount``. Requests are dispatched straight to
the manager, bypassing the SDK's router, so ``/mcp`` and ``/mcp/...`` both work. Stateless GET
would open an SSE stream that never carries anything; it is answered 405, which the spec allows
and the official client handles by not opening the stream.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from http import HTTPStatus

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from mcp2anp_middleware.sessions.jsonrpc_errors import INVALID_REQUEST, send_jsonrpc_error


class MCPEndpoint:
    """ASGI app serving one :class:`MCPServer` in stateless mode, plus the service that runs it."""

    def __init__(self, server: MCPServer, *, json_response: bool = True) -> None:
        self.server = server
        # Host/Origin checks are the middleware's job (it knows the embedding app's host names).
        server.streamable_http_app(
            stateless_http=True,
            json_response=json_response,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.session_manager = server.session_manager

    def service(self) -> AbstractAsyncContextManager[object]:
        """The SDK session manager's run() context, to be kept open while the server runs."""
        return self.session_manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            await send_jsonrpc_error(
                send,
                405,
                INVALID_REQUEST,
                "Method Not Allowed: this server sends no server-initiated SSE stream",
                headers=[(b"allow", b"POST, DELETE")],
            )
            return
        await self.session_manager.handle_request(scope, receive, _jsonrpc_errors_only(send))


def _jsonrpc_errors_only(send: Send) -> Send:
    """Rewrites the SDK's few non-JSON error answers (empty 405/406, text/plain 400) so every
    refusal a client sees carries a JSON-RPC error body."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            if message["status"] >= 400 and not headers.get("content-type", "").startswith(
                "application/json"
            ):
                held = message
                return
        elif held is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = held["status"]
            text = b"".join(chunks).decode("utf-8", "replace").strip()[:200]
            keep = [
                (name, value)
                for name, value in held.get("headers", [])
                if name.lower() in (b"allow", b"retry-after")
            ]
            held = None
            await send_jsonrpc_error(
                send, status, INVALID_REQUEST, text or HTTPStatus(status).phrase, headers=keep
            )
            return
        await send(message)

    return sending
