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

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from .jsonrpc_errors import INVALID_REQUEST, send_jsonrpc_error


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
        await self.session_manager.handle_request(scope, receive, send)
