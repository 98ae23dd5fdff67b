"""Pass-through, protocol eras and logging."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import structlog

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import SessionPolicy

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT

pytestmark = pytest.mark.anyio

CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
MODERN = {"MCP-Protocol-Version": "2026-07-28"}


def build(clock: ManualClock | None = None) -> tuple[MCPSessionMiddleware, RecordingMCPApp]:
    inner = RecordingMCPApp()
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=inner, clock=clock or ManualClock(), policy=SessionPolicy(timeout=60)
    )
    return middleware, inner


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.mark.parametrize("path", ["/", "/mcpx", "/other/mcp", "/api"])
async def test_paths_outside_prefix_pass_through_untouched(path: str) -> None:
    host = HostApp()
    middleware = MCPSessionMiddleware(host, mcp_app=RecordingMCPApp())
    async with client_for(middleware) as client:
        response = await client.post(path, headers={"Mcp-Session-Id": "whatever"})
    assert response.text == "host" and "mcp-session-id" not in response.headers
    assert "state" not in host.scopes[0] or "mcp_session" not in host.scopes[0]["state"]
    assert len(middleware.registry) == 0


async def test_non_http_scopes_pass_through() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    middleware = MCPSessionMiddleware(app)
    scope = {"type": "websocket", "path": "/mcp", "headers": []}
    await middleware(scope, None, None)  # type: ignore[arg-type]
    assert seen == [scope] and seen[0] is scope


async def test_custom_prefix_and_subpaths() -> None:
    inner = RecordingMCPApp()
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=inner, path_prefix="/agents/mcp")
    async with client_for(middleware) as client:
        assert (await client.post("/mcp", json=INIT)).text == "host"
        response = await client.post("/agents/mcp/v1", json=INIT)
    assert "mcp-session-id" in response.headers


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        MCPSessionMiddleware(HostApp(), path_prefix="mcp")
    with pytest.raises(ValueError):
        MCPSessionMiddleware(HostApp(), path_prefix="/mcp/")


async def test_sessionless_era_never_mints_or_echoes_ids() -> None:
    middleware, inner = build()
    async with client_for(middleware) as client:
        first = await client.post("/mcp", json=CALL, headers=MODERN)
        second = await client.post(
            "/mcp", json=CALL, headers={**MODERN, "Mcp-Session-Id": "stale-id-from-elsewhere"}
        )
    for response in (first, second):
        assert response.status_code == 200
        assert "mcp-session-id" not in response.headers
    # one implicit session for the (anonymous) principal, shared by both requests
    assert inner.seen[0] is inner.seen[1] and inner.seen[0].implicit
    assert len(middleware.registry) == 1


async def test_sessionless_implicit_session_expires_too() -> None:
    clock = ManualClock()
    middleware, inner = build(clock)
    async with client_for(middleware) as client:
        await client.post("/mcp", json=CALL, headers=MODERN)
        clock.advance(61)
        assert await middleware.registry.sweep() == 1
        await client.post("/mcp", json=CALL, headers=MODERN)
    assert inner.seen[0] is not inner.seen[1]
    assert inner.seen[0].closed and not inner.seen[1].closed


@pytest.mark.parametrize("version", ["2025-11-25", "2025-06-18", "garbage"])
async def test_handshake_era_versions_need_a_session(version: str) -> None:
    middleware, _ = build()
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json=CALL, headers={"MCP-Protocol-Version": version})
    assert response.status_code == 400


async def test_log_events_and_fields_never_hold_whole_ids() -> None:
    clock = ManualClock()
    middleware, _ = build(clock)
    with structlog.testing.capture_logs() as logs:
        async with client_for(middleware) as client:
            created = await client.post("/mcp", json=INIT)
            session_id = created.headers["mcp-session-id"]
            await client.post("/mcp", json=CALL, headers={"Mcp-Session-Id": session_id})
            await middleware.registry.sweep()
            clock.advance(61)
            await middleware.registry.sweep()
    by_event = {entry["event"]: entry for entry in logs}
    assert by_event["Session created"]["total_sessions"] == 1
    assert "session_id" in by_event["Using existing session"]
    assert by_event["No expired sessions to clean up"]["log_level"] == "debug"
    assert by_event["No expired sessions to clean up"]["total_sessions"] == 1
    assert by_event["Cleaning up expired sessions"]["count"] == 1
    assert by_event["Cleaning up expired sessions"]["timeout"] == 60
    assert by_event["Session removed"]["total_sessions"] == 0
    for entry in logs:
        assert session_id not in repr(entry)
        if "session_id" in entry:
            assert session_id.startswith(entry["session_id"].rstrip("…"))
