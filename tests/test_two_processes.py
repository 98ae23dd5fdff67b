"""Two real example-app processes sharing one real redis-server, driven by the official client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import httpx2
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp2anp_middleware import ensure_dev_identity

from .processes import launcher
from .redis_server import RedisServer
from .servers import free_port

pytestmark = pytest.mark.anyio

LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}


async def status(method: str, base_url: str, session_id: str) -> int:
    headers = {**HEADERS, "Mcp-Session-Id": session_id}
    async with httpx.AsyncClient() as http:
        if method == "DELETE":
            response = await http.delete(f"{base_url}/mcp", headers=headers)
        else:
            response = await http.post(f"{base_url}/mcp", json=LIST, headers=headers)
    return response.status_code


async def open_session(base_url: str) -> str:
    """Initialize with the official client (legacy mode) and return the id the server minted."""
    minted: list[str] = []

    async def on_response(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            minted.append(response.headers["mcp-session-id"])

    async with httpx2.AsyncClient(event_hooks={"response": [on_response]}) as http:
        url = f"{base_url}/mcp"
        transport = streamable_http_client(url, http_client=http, terminate_on_close=False)
        async with Client(transport, mode="legacy") as client:
            tools = await client.list_tools()
    assert {t.name for t in tools.tools} >= {"anp_fetchDoc", "anp_invokeOpenRPC"}
    return minted[0]


async def test_sessions_are_shared_across_processes_and_restarts(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", persist=True)
    redis.start()
    data_dir = tmp_path / "data"
    ensure_dev_identity(data_dir)  # both processes sign as the same dev identity
    port_a, port_b = free_port(), free_port()
    store = ("--store-url", redis.url)
    try:
        with (
            launcher(tmp_path, *store, port=port_a, name="a", data_dir=data_dir) as a,
            launcher(tmp_path, *store, port=port_b, name="b", data_dir=data_dir) as b,
        ):
            session_id = await open_session(a.base_url)
            assert await status("POST", b.base_url, session_id) == 200  # made on A, used on B
            survivor = await open_session(b.base_url)
            assert await status("DELETE", b.base_url, session_id) == 204
            assert await status("POST", a.base_url, session_id) == 404  # B's DELETE seen by A
            assert await status("POST", a.base_url, survivor) == 200
        # Both processes stopped (Ctrl-C). Start them again: the sessions are still there.
        with (
            launcher(tmp_path, *store, port=port_a, name="a2", data_dir=data_dir) as a,
            launcher(tmp_path, *store, port=port_b, name="b2", data_dir=data_dir) as b,
        ):
            assert await status("POST", b.base_url, survivor) == 200
            assert await status("POST", a.base_url, survivor) == 200
            # Expiry applies everywhere: once Redis expires the session (its TTL is what
            # enforces the idle timeout; shortened here instead of waiting 30 minutes), neither
            # process serves it any more.
            client = aioredis.Redis.from_url(redis.url)
            key = f"mcp2anp:s:{survivor}"
            await client.pexpire(key, 50)
            deadline = time.monotonic() + 10
            while await client.exists(key):
                assert time.monotonic() < deadline, "Redis never expired the session"
                await asyncio.sleep(0.05)
            await client.aclose()
            # Each process trusts its last read of a session it serves for the store's recheck
            # (1 s, ended sessions are announced at once; a TTL expiry is not): within it, both
            # refuse the session.
            for base_url in (b.base_url, a.base_url):
                while await status("POST", base_url, survivor) != 404:
                    assert time.monotonic() < deadline, "a process kept serving the session"
                    await asyncio.sleep(0.05)
    finally:
        redis.stop()


async def test_admin_lists_and_revokes_across_processes(tmp_path: Path) -> None:
    """Sessions made on A and B are listed by either; revoking on B ends them on both."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    data_dir = tmp_path / "data"
    principal = ensure_dev_identity(data_dir).principal
    options = ("--store-url", redis.url, "--admin-token", ADMIN_TOKEN)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        with (
            launcher(tmp_path, *options, port=free_port(), name="a", data_dir=data_dir) as a,
            launcher(tmp_path, *options, port=free_port(), name="b", data_dir=data_dir) as b,
        ):
            made = [await open_session(a.base_url), await open_session(b.base_url)]
            async with httpx.AsyncClient() as http:
                url_a, url_b = (
                    f"{a.base_url}/mcp-admin/sessions",
                    f"{b.base_url}/mcp-admin/sessions",
                )
                assert (await http.get(url_a)).status_code == 401
                listed = await http.get(url_a, params={"principal": principal}, headers=admin)
                assert listed.status_code == 200
                sessions = listed.json()["sessions"]
                assert sorted(s["id"] for s in sessions) == sorted(m[:8] + "…" for m in made)
                assert all(m not in listed.text for m in made)  # never a whole id
                revoked = await http.delete(url_b, params={"principal": principal}, headers=admin)
                assert revoked.json() == {"revoked": 2}
                listed = await http.get(url_a, params={"principal": principal}, headers=admin)
                assert listed.json() == {"sessions": []}
            for session_id in made:
                assert await status("POST", a.base_url, session_id) == 404
                assert await status("POST", b.base_url, session_id) == 404
    finally:
        redis.stop()


ADMIN_TOKEN = "admin-token-for-tests"
