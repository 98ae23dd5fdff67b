"""An MCP server exercising what full sessions carry: handshake, notifications, server→client
requests, standalone notifications, and a tool that waits for the test's signal."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import anyio.lowlevel
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import SamplingMessage, TextContent
from pydantic import BaseModel


class Gate:
    """Lets a test decide when a tool call ends (no sleeps): ``release`` opens it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.released = asyncio.Event()


class Choice(BaseModel):
    color: str


def fidelity_server(gate: Gate | None = None) -> MCPServer:
    server = MCPServer("fidelity")

    @server.tool()
    async def whoami(ctx: Context) -> str:
        """What the handshake told this worker about the client."""
        params = ctx.session.client_params
        capabilities = ctx.client_capabilities
        return json.dumps(
            {
                "client": params.client_info.name if params is not None else None,
                "sampling": capabilities is not None and capabilities.sampling is not None,
                "elicitation": capabilities is not None and capabilities.elicitation is not None,
                "protocol": ctx.session.protocol_version
                if hasattr(ctx.session, "protocol_version")
                else None,
            }
        )

    @server.tool()
    async def chatty(ctx: Context) -> str:
        await ctx.report_progress(1, 2, "half")
        await ctx.warning("a warning")
        await ctx.debug("a debug line")
        await ctx.report_progress(2, 2, "done")
        return "chatted"

    @server.tool()
    async def close_get(ctx: Context) -> str:
        """Ends the session's standalone GET stream (SEP-1699 polling), on any worker."""
        await ctx.close_standalone_sse_stream()
        return "closed"

    @server.tool()
    async def ask(ctx: Context) -> str:
        result = await ctx.session.create_message(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text="hi"))],
            max_tokens=10,
            related_request_id=ctx.request_id,  # on this request's stream, not the GET stream
        )
        content: Any = result.content
        return f"sampled: {content.text}"

    @server.tool()
    async def pick(ctx: Context) -> str:
        answer = await ctx.elicit("Pick a color", Choice)
        data: Any = getattr(answer, "data", None)
        return f"{answer.action}: {data.color if data is not None else None}"

    @server.tool()
    async def touch(ctx: Context) -> str:
        await ctx.session.send_resource_updated("test://thing")
        return "touched"

    @server.tool()
    async def body_size(ctx: Context) -> str:
        """The size of the HTTP request's body, read after the request's watch has started."""
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        request = ctx.request_context.request
        assert request is not None
        return str(len(await request.body()))

    @server.tool()
    async def stream_size(ctx: Context) -> str:
        """The size of the HTTP request's body, read as a stream at once; then a wait long
        enough for the request's watch to start."""
        request = ctx.request_context.request
        assert request is not None
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        return str(size)

    @server.tool()
    async def slow(ctx: Context) -> str:
        await ctx.report_progress(1, 2, "started")
        if gate is not None:
            gate.started.set()
            await gate.released.wait()
        return "slow done"

    return server
