"""2. Session overhead: an MCP ``tools/call`` with session resolution vs the bare endpoint.

Side A is the MCP endpoint (``MCPEndpoint``: the SDK's server with full sessions) called
directly with the session already in its scope. Side B is the same endpoint behind
``MCPSessionMiddleware`` (in-memory store, anonymous authenticator), the request
carrying the ``Mcp-Session-Id`` of a session created by a real ``initialize`` through the
middleware (handshake era: ``MCP-Protocol-Version: 2025-11-25``). The tool is trivial (returns a
constant). Both sides run inside ``async with endpoint.service():`` and are driven in-process
with direct ASGI calls; cost is server CPU per request (``time.process_time``), with wall time
(``perf_counter``) printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.mcp_hosting.endpoint import SESSION_SCOPE_KEY, MCPEndpoint

from .common import (
    INITIALIZE,
    MCP_HEADERS,
    Result,
    call_asgi,
    cost_of,
    http_scope,
    log,
    paired_async,
    run_module,
    spread,
)

HEADERS = [*MCP_HEADERS, (b"mcp-protocol-version", b"2025-11-25")]
TOOL_CALL = json.dumps(
    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "ping", "arguments": {}}}
).encode()
EXPECTED = b'"structuredContent":{"result":"pong"}'


def trivial_server() -> MCPServer:
    server = MCPServer("bench")

    @server.tool()
    def ping() -> str:
        """Returns a constant."""
        return "pong"

    return server


async def host_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def run(quick: bool) -> list[Result]:
    logging.getLogger("mcp").setLevel(logging.WARNING)
    endpoint = MCPEndpoint(trivial_server())
    middleware = MCPSessionMiddleware(host_app, mcp_app=endpoint)
    iterations = 40 if quick else 150
    rounds = 7 if quick else 25
    async with endpoint.service():
        await middleware.startup()
        try:
            created = await call_asgi(middleware, http_scope("POST", "/mcp", HEADERS), INITIALIZE)
            session_id = created.header(b"mcp-session-id")
            assert created.status == 200 and session_id, created.status
            session_headers = [*HEADERS, (b"mcp-session-id", session_id)]
            session_scope = http_scope("POST", "/mcp", session_headers)
            # The endpoint alone, given the session the middleware would resolve.
            (state,) = middleware.registry.live_sessions()
            bare_scope = http_scope("POST", "/mcp", session_headers)
            bare_scope["state"] = {SESSION_SCOPE_KEY: state}
            for app, scope in ((endpoint, bare_scope), (middleware, session_scope)):
                answer = await call_asgi(app, scope, TOOL_CALL)
                assert answer.status == 200 and EXPECTED in answer.body, answer.body
            rows = []
            for clock, label in ((time.process_time, "CPU"), (time.perf_counter, "wall")):
                paired = await paired_async(
                    _side(endpoint, bare_scope, iterations, clock),
                    _side(middleware, session_scope, iterations, clock),
                    rounds,
                )
                bare_us = sorted(paired.a)[len(paired.a) // 2] * 1e6
                added = (paired.ratio - 1) * bare_us
                log(
                    f"  {label}: bare endpoint {bare_us:.0f} us/call, with sessions ratio "
                    f"{paired.ratio:.4f} (~{added:.1f} us added); {spread(paired.ratios)}"
                )
                rows.append((paired, bare_us, added, label))
            sessions = len(middleware.registry)
        finally:
            await middleware.shutdown()
    assert sessions == 1, sessions
    cpu, bare_us, added, _ = rows[0]
    wall = rows[1][0]
    detail = (
        f"CPU/request: bare {bare_us:.0f} us, +{added:.1f} us with sessions; "
        f"wall ratio {wall.ratio:.3f}; {spread(cpu.ratios)}"
    )
    return [Result("2. session overhead, tools/call (CPU)", cpu.ratio, "<= 1.10", detail)]


def _side(app: Any, scope: dict[str, Any], iterations: int, clock: Callable[[], float]) -> Any:
    return lambda: cost_of(app, scope, TOOL_CALL, iterations, clock)


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[2] session overhead, tools/call, in-process ASGI")
    results = asyncio.run(run(args.quick))
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
