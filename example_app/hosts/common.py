"""Pieces the three host examples share: settings from the environment, the demo agent, and a
host-owned MCP server with one tool of its own (``host_session_prefix``)."""

from __future__ import annotations

import os
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from starlette.applications import Starlette

from example_app.demo_agent import LoopbackHttpDidResolver, create_demo_agent
from mcp2anp_middleware import session_from_request

DATA_DIR_ENV = "MCP2ANP_DATA_DIR"
PORT_ENV = "MCP2ANP_PORT"
DEFAULT_DATA_DIR = ".mcp2anp-data"
DEFAULT_PORT = 8000  # uvicorn's default port


def data_dir_from_env(data_dir: Path | str | None = None) -> Path:
    """``data_dir`` if given, else ``$MCP2ANP_DATA_DIR``, else ``.mcp2anp-data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


def port_from_env(port: int | None = None) -> int:
    """``port`` if given, else ``$MCP2ANP_PORT``, else 8000; must match uvicorn's ``--port``."""
    if port is not None:
        return port
    return int(os.environ.get(PORT_ENV, str(DEFAULT_PORT)))


def base_url_for(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def demo_agent(base_url: str) -> Starlette:
    """The offline demo ANP agent, served at ``{base_url}/agent``.

    It resolves caller DIDs over HTTP, as an agent elsewhere would, but from loopback only:
    development mode makes its DID for ``public_url`` (``did:wba:localhost%3A<port>:users:dev:...``)
    and ANPMiddleware serves that document from this very app, so the tools' signed calls are
    accepted without the agent reading the data directory.
    """
    return create_demo_agent(base_url=f"{base_url}/agent", did_resolver=LoopbackHttpDidResolver())


def host_mcp_server(name: str) -> MCPServer:
    """The host's own MCP server: ANPMiddleware adds ``anp_fetchDoc``/``anp_invokeOpenRPC`` to it.

    ``host_session_prefix`` shows how host code reads the session: MCP tools run under the
    ``/mcp`` prefix, so ``session_from_request`` finds the caller's ``SessionState`` there. Host
    routes outside the prefix (``/whoami``) always get None.
    """
    server = MCPServer(name)

    @server.tool()
    def host_session_prefix(ctx: Context) -> str | None:
        """The first 8 characters of the MCP session id this call belongs to (None if none)."""
        session = session_from_request(ctx.request_context.request)
        return session.session_id[:8] if session is not None else None

    return server
