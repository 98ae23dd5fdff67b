"""The official mcp client against a real uvicorn on 127.0.0.1, through the middleware."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from starlette.types import Receive, Scope, Send

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.sessions.middleware import SESSION_SCOPE_KEY

from .servers import serve

pytestmark = pytest.mark.anyio


def session_echo_server() -> MCPServer:
    server = MCPServer("session-echo")

    @server.tool()
    def current_session(ctx: Context) -> str:
        """Return the id of the session the middleware resolved for this request."""
        request = ctx.request_context.request
        assert request is not None
        state = request.scope["state"][SESSION_SCOPE_KEY]
        return str(state.session_id)

    return server


class HeaderRecorder:
    """Outermost ASGI layer that records request and response session headers."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, str | None]] = []
        self.responses: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        sid = headers.get(b"mcp-session-id")
        self.requests.append((scope["method"], sid.decode() if sid else None))

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                value = dict(message["headers"]).get(b"mcp-session-id")
                self.responses.append(value.decode() if value else None)
            await send(message)

        await self.app(scope, receive, recording_send)


async def host(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        raise ValueError("no lifespan here")
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_legacy_client_keeps_and_resends_the_session_id() -> None:
    endpoint = MCPEndpoint(session_echo_server())
    middleware = MCPSessionMiddleware(host, mcp_app=endpoint, services=[endpoint.service])
    recorder = HeaderRecorder(middleware)
    async with serve(recorder) as base_url, httpx2.AsyncClient() as http:
        transport = streamable_http_client(f"{base_url}/mcp", http_client=http)
        async with Client(transport, mode="legacy") as client:
            minted = recorder.responses[0]
            assert minted is not None and len(middleware.registry) == 1
            first = await client.call_tool("current_session", {})
            second = await client.call_tool("current_session", {})
        assert not first.is_error
        assert first.structured_content == {"result": minted}
        assert second.structured_content == {"result": minted}
        # initialize carried no id; every later request (POSTs and the DELETE on close) sent it
        assert recorder.requests[0] == ("POST", None)
        assert all(sid == minted for _, sid in recorder.requests[1:])
        assert ("DELETE", minted) in recorder.requests
        assert len(middleware.registry) == 0  # closed by the client's DELETE
        assert recorder.responses.count(minted) == 1  # minted once, never echoed later


async def test_default_client_uses_sessionless_era_without_ids() -> None:
    endpoint = MCPEndpoint(session_echo_server())
    middleware = MCPSessionMiddleware(host, mcp_app=endpoint, services=[endpoint.service])
    recorder = HeaderRecorder(middleware)
    async with serve(recorder) as base_url, httpx2.AsyncClient() as http:
        transport = streamable_http_client(f"{base_url}/mcp", http_client=http)
        async with Client(transport) as client:
            first = await client.call_tool("current_session", {})
            second = await client.call_tool("current_session", {})
    assert first.structured_content == second.structured_content
    assert all(sid is None for _, sid in recorder.requests)
    assert all(sid is None for sid in recorder.responses)
    registry = middleware.registry
    assert await registry.store.count(now=registry.clock()) == 1  # the principal's implicit one
