"""Caps, statistics, metrics, graceful shutdown, state file, and Redis outages (in-process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mcp2anp_middleware import AuthenticationError, Credentials, MCPSessionMiddleware, SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.metrics import SessionMetricsCollector
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT
from .messages import PING
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio


async def by_key(credentials: Credentials) -> SessionConfig:
    if credentials.api_key in ("alice", "bob"):
        return SessionConfig(principal=credentials.api_key)
    raise AuthenticationError("unknown API key")


def build(**options: Any) -> tuple[MCPSessionMiddleware, RecordingMCPApp]:
    inner = RecordingMCPApp()
    options.setdefault("clock", ManualClock())
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=inner, authenticator=by_key, **options)
    return middleware, inner


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def init(client: httpx.AsyncClient, key: str = "alice") -> httpx.Response:
    return await client.post("/mcp", json=INIT, headers={"X-API-Key": key})


async def test_per_principal_cap_rejects_with_429() -> None:
    middleware, _ = build(policy=SessionPolicy(per_principal_cap=2))
    async with client_for(middleware) as client:
        assert (await init(client)).status_code == 200
        assert (await init(client)).status_code == 200
        refused = await init(client)
        other = await init(client, "bob")
    assert refused.status_code == 429
    assert "mcp-session-id" not in refused.headers
    assert "limit 2" in refused.json()["error"]["message"]
    assert other.status_code == 200
    assert middleware.registry.stats.rejected["cap_principal"] == 1


async def test_per_principal_cap_can_evict_the_oldest() -> None:
    middleware, _ = build(
        policy=SessionPolicy(per_principal_cap=1, cap_policy="evict_oldest"),
    )
    async with client_for(middleware) as client:
        first = (await init(client)).headers["mcp-session-id"]
        second = (await init(client)).headers["mcp-session-id"]
        gone = await client.post(
            "/mcp", json=PING, headers={"X-API-Key": "alice", "Mcp-Session-Id": first}
        )
        kept = await client.post(
            "/mcp", json=PING, headers={"X-API-Key": "alice", "Mcp-Session-Id": second}
        )
    assert gone.status_code == 404 and kept.status_code == 200


async def test_global_cap_is_503() -> None:
    middleware, _ = build(policy=SessionPolicy(global_cap=1))
    async with client_for(middleware) as client:
        assert (await init(client)).status_code == 200
        refused = await init(client, "bob")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == -32603


async def test_statistics_endpoint_is_off_by_default_and_token_protected() -> None:
    off, _ = build()
    async with client_for(off) as client:
        assert (await client.get("/mcp-stats")).text == "host"  # not served: the host answers

    middleware, _ = build(stats_path="/mcp-stats", stats_token="s3cret")
    async with client_for(middleware) as client:
        await init(client)
        await client.post("/mcp", json=PING, headers={"X-API-Key": "alice", "Mcp-Session-Id": "x"})
        await client.post("/mcp", json=INIT, headers={"X-API-Key": "wrong"})
        denied = await client.get("/mcp-stats")
        wrong = await client.get("/mcp-stats", headers={"Authorization": "Bearer nope"})
        stats = await client.get("/mcp-stats", headers={"Authorization": "Bearer s3cret"})
    assert denied.status_code == 401 and wrong.status_code == 401
    body = stats.json()
    assert body["active_sessions"] == 1 and body["created"] == 1
    assert body["rejected"] == {"unknown_session": 1, "unauthorized": 1}
    assert body["store"] == {"type": "InMemorySessionStore", "healthy": True}
    assert {"sweeps", "max_sweep_seconds", "removed", "in_flight_requests"} <= set(body)


async def test_prometheus_collector_exports_counters() -> None:
    middleware, _ = build()
    registry = CollectorRegistry()
    registry.register(SessionMetricsCollector(middleware))
    async with client_for(middleware) as client:
        session_id = (await init(client)).headers["mcp-session-id"]
        await client.delete("/mcp", headers={"X-API-Key": "alice", "Mcp-Session-Id": session_id})
    text = generate_latest(registry).decode()
    assert "mcp2anp_sessions_created_total 1.0" in text
    assert 'mcp2anp_sessions_removed_total{reason="deleted"} 1.0' in text


async def test_graceful_shutdown_drains_in_flight_and_refuses_new_sessions() -> None:
    middleware, inner = build(shutdown_grace=30)
    async with client_for(middleware) as client:
        session_id = (await init(client)).headers["mcp-session-id"]
        blocked = asyncio.create_task(
            client.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 5, "method": "block"},
                headers={"X-API-Key": "alice", "Mcp-Session-Id": session_id},
            )
        )
        await inner.started.wait()
        shutdown = asyncio.create_task(middleware.shutdown())
        await asyncio.sleep(0)  # let shutdown() start: it stops accepting before it awaits
        assert not middleware.registry.accepting
        refused = await init(client, "bob")
        assert refused.status_code == 503
        assert not shutdown.done()  # waiting for the in-flight request
        inner.release.set()
        assert (await blocked).status_code == 200
        await shutdown
    assert not middleware.background.running


async def test_state_file_saves_and_restores_unexpired_sessions(tmp_path: Path) -> None:
    state_file = tmp_path / "sessions.json"
    clock = ManualClock()
    first, _ = build(clock=clock, state_file=state_file, policy=SessionPolicy(timeout=60))
    async with client_for(first) as client:
        old = (await init(client)).headers["mcp-session-id"]  # last used at t
        clock.advance(50)
        recent = (await init(client, "bob")).headers["mcp-session-id"]  # last used at t+50
    await first.shutdown()
    assert state_file.stat().st_mode & 0o777 == 0o600
    saved = json.loads(state_file.read_text())
    assert {s["id"] for s in saved["sessions"]} == {old, recent}

    clock.advance(20)  # now t+70: "old" idle 70 s (> 60) is not restored, "recent" (20 s) is
    second, _ = build(clock=clock, state_file=state_file, policy=SessionPolicy(timeout=60))
    async with client_for(second) as client:
        ok = await client.post(
            "/mcp", json=PING, headers={"X-API-Key": "bob", "Mcp-Session-Id": recent}
        )
        wrong_principal = await client.post(
            "/mcp", json=PING, headers={"X-API-Key": "alice", "Mcp-Session-Id": recent}
        )
        expired = await client.post(
            "/mcp", json=PING, headers={"X-API-Key": "alice", "Mcp-Session-Id": old}
        )
    assert ok.status_code == 200
    assert wrong_principal.status_code == 404 and expired.status_code == 404
    assert not state_file.exists()  # consumed on restore
    await second.shutdown()


async def test_redis_outage_is_503_and_service_resumes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persist=True)
    server.start()
    # recheck=0: every lookup asks the store (else a session committed within the last second
    # is served from this process's confirmed view, as designed, and never meets the outage)
    store = RedisSessionStore.from_url(server.url, timeout=1.0, recheck=0)
    middleware, _ = build(store=store)
    try:
        async with client_for(middleware) as client:
            session_id = (await init(client)).headers["mcp-session-id"]
            headers = {"X-API-Key": "alice", "Mcp-Session-Id": session_id}
            server.stop()
            during = [
                await client.post("/mcp", json=PING, headers=headers),
                await init(client),
                await client.delete("/mcp", headers=headers),
            ]
            for response in during:
                assert response.status_code == 503
                assert response.json()["error"]["message"].startswith("Session store unavailable")
            server.start()  # same port, AOF persistence: the session survived the restart
            after = await client.post("/mcp", json=PING, headers=headers)
            assert after.status_code == 200
            assert (await init(client)).status_code == 200
        assert middleware.registry.stats.rejected["store_unavailable"] == 3
    finally:
        await middleware.shutdown()
        server.stop()


async def test_evicted_session_is_closed_and_counted() -> None:
    middleware, inner = build(
        policy=SessionPolicy(per_principal_cap=1, cap_policy="evict_oldest"),
    )
    async with client_for(middleware) as client:
        await init(client)
        await init(client)
    first, second = inner.seen[0], inner.seen[1]
    assert first.closed and not second.closed
    assert middleware.registry.stats.removed["evicted"] == 1
