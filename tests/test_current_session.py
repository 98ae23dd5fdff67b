"""``current_session()``: a tool finds the session of the call it serves, sync or async, in
either protocol era, and nothing outside a request; the reference held for it is weak."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.types import TextContent
from starlette.applications import Starlette

from mcp2anp_middleware import ANPMiddleware, current_session
from mcp2anp_middleware.sessions.state import SERVING, SessionConfig, SessionState

from .servers import serve

pytestmark = pytest.mark.anyio


def session_server() -> MCPServer:
    server = MCPServer("current-session")

    @server.tool()
    async def async_session() -> str:
        state = current_session()
        return state.session_id if state is not None else "none"

    @server.tool()
    def sync_session() -> str:  # the SDK runs it in a worker thread, the context copied
        state = current_session()
        return state.session_id if state is not None else "none"

    return server


def text_of(result: object) -> str:
    content = getattr(result, "content", [])
    assert content and isinstance(content[0], TextContent), result
    return content[0].text


async def test_a_tool_finds_the_session_of_its_own_call(tmp_path: Path) -> None:
    app = ANPMiddleware(Starlette(), server=session_server(), data_dir=tmp_path)
    async with serve(app) as base_url:
        seen: list[str] = []
        for _ in range(2):  # two sessions: each call sees its own
            async with (
                httpx2.AsyncClient() as http,
                Client(
                    streamable_http_client(f"{base_url}/mcp", http_client=http), mode="legacy"
                ) as client,
            ):
                ids = list(app.registry._live)  # the one session open now
                assert len(ids) == 1
                assert text_of(await client.call_tool("async_session", {})) == ids[0]
                assert text_of(await client.call_tool("sync_session", {})) == ids[0]
                seen.append(ids[0])
        assert seen[0] != seen[1]
    assert current_session() is None  # outside any request


async def test_the_session_is_held_weakly() -> None:
    """A task or timer started during a request keeps its context: it must not keep the
    session alive once the session has ended."""
    state = SessionState("s" * 43, SessionConfig(principal="p"), created_at=0.0)
    token = SERVING.set(weakref.ref(state))
    try:
        assert current_session() is state
        del state
        gc.collect()
        assert current_session() is None
    finally:
        SERVING.reset(token)
