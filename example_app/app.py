"""The demo host: a small Starlette app with the middleware around it."""

from __future__ import annotations

from mcp.server.mcpserver import Context, MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcp2anp_middleware import SESSION_SCOPE_KEY, MCPSessionMiddleware
from mcp2anp_middleware.mcp_endpoint import MCPEndpoint

from .settings import Settings


async def index(request: Request) -> JSONResponse:
    return JSONResponse({"service": "mcp2anp-middleware demo", "mcp": "/mcp"})


def build_mcp_server() -> MCPServer:
    server = MCPServer("mcp2anp-demo")

    @server.tool()
    def current_session(ctx: Context) -> str:
        """Return a short form of the id of the MCP session this call belongs to."""
        state = ctx.request_context.request.scope["state"][SESSION_SCOPE_KEY]
        return str(state.session_id)[:8]

    return server


def create_app(settings: Settings) -> MCPSessionMiddleware:
    host = Starlette(routes=[Route("/", index)])
    endpoint = MCPEndpoint(build_mcp_server())
    return MCPSessionMiddleware(
        host,
        mcp_app=endpoint,
        services=[endpoint.service],
        session_timeout=settings.session_timeout,
        cleanup_interval=settings.cleanup_interval,
    )
