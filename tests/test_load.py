"""A bounded load test of the whole stack on loopback: real uvicorn, real HTTP, real signatures.

Hundreds of handshake-era sessions, held open at the same time and spread over a few dozen API
keys (each its own DID), make repeated ``anp_invokeOpenRPC whoami`` calls to the demo agent. Every
request must succeed and every call must be signed by its own session's DID. Then the (manual)
clock passes the idle timeout: one sweep empties the store and the sessions' objects, their tool
handlers and signers included, are garbage.

Sized for CI on 2 shared cores: the client bounds its in-flight requests with a semaphore, all
sessions stay alive together; no assertion is about time.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.routing import Mount

from example_app.demo_agent import StaticDidResolver, create_demo_agent, create_demo_identity
from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.anp_tools.signing import SessionSigner
from mcp2anp_middleware.anp_tools.toolkit import ATTACHMENT, ANPToolHandler, SessionCrawler
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.hosting import ANPMiddleware
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.state import SessionState
from mcp2anp_middleware.sessions.stores import InMemorySessionStore

from .anp_stack import KeyAuthenticator
from .messages import answer_of
from .servers import free_port, serve

pytestmark = pytest.mark.anyio

SESSIONS = 500  # raw JSON-RPC sessions, all alive at the same time
OFFICIAL_SESSIONS = 4  # plus a few through the official client, concurrently with the load
KEYS = 24  # distinct API keys, each with its own DID
CALLS_PER_SESSION = 3
CLIENT_CONCURRENCY = 48  # requests in flight from the raw client at once
SESSION_TIMEOUT = 600.0
REQUEST_TIMEOUT = 60.0

PROTOCOL = "2025-11-25"
ACCEPT = {"Accept": "application/json, text/event-stream"}


@dataclass
class LoadStack:
    base_url: str
    middleware: ANPMiddleware
    dids: dict[str, str]  # API key -> the DID its sessions sign with

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    @property
    def rpc_url(self) -> str:
        return f"{self.base_url}/agent/rpc"


@asynccontextmanager
async def load_stack(tmp_path: Path, clock: ManualClock) -> AsyncIterator[LoadStack]:
    """Host + demo agent + ANPMiddleware on uvicorn, with ``KEYS`` API keys the agent knows."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    configs: dict[str, SessionConfig] = {}
    dids: dict[str, str] = {}
    documents = {}
    for index in range(KEYS):
        name = f"user{index:02d}"
        identity = create_demo_identity(tmp_path, name, port=port)
        key = f"key-{name}-{index:04d}-0123456789"
        configs[key] = SessionConfig(
            principal=name,
            did_document_path=identity.did_document_path,
            private_key_path=identity.private_key_path,
        )
        dids[key] = identity.did
        documents[identity.did] = identity.did_document
    agent = create_demo_agent(
        base_url=f"{base_url}/agent", did_resolver=StaticDidResolver(documents)
    )
    host = Starlette(routes=[Mount("/agent", app=agent)])
    middleware = ANPMiddleware(
        host,
        authenticator=KeyAuthenticator(configs),
        url_policy=URLPolicy(allow_private=True),
        entry_url=f"{base_url}/agent/ad.json",
        clock=clock,
        policy=SessionPolicy(timeout=SESSION_TIMEOUT),
    )
    async with serve(middleware, port=port):
        yield LoadStack(base_url, middleware, dids)


class RawClient:
    """Handshake-era MCP over plain JSON-RPC POSTs; every request is checked, counted, bounded."""

    def __init__(self, stack: LoadStack, http: httpx.AsyncClient, limit: int) -> None:
        self.stack = stack
        self.http = http
        self.gate = asyncio.Semaphore(limit)
        self.requests = 0

    async def post(self, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        async with self.gate:
            response = await self.http.post(
                self.stack.mcp_url, json=body, headers={**ACCEPT, **headers}
            )
        self.requests += 1
        return response

    async def open_session(self, key: str) -> str:
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "load", "version": "1"},
            },
        }
        response = await self.post(init, {"X-API-Key": key})
        assert response.status_code == 200, response.text
        assert answer_of(response)["result"]["protocolVersion"] == PROTOCOL
        session_id = response.headers["mcp-session-id"]
        headers = self.session_headers(key, session_id)
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        response = await self.post(initialized, headers)
        assert response.status_code == 202, response.text
        return session_id

    @staticmethod
    def session_headers(key: str, session_id: str) -> dict[str, str]:
        return {"X-API-Key": key, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL}

    async def whoami(self, key: str, session_id: str, request_id: int) -> str:
        call = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {
                "name": "anp_invokeOpenRPC",
                "arguments": {"endpoint": self.stack.rpc_url, "method": "whoami"},
            },
        }
        response = await self.post(call, self.session_headers(key, session_id))
        assert response.status_code == 200, response.text
        message = answer_of(response)
        assert message["id"] == request_id and "error" not in message, message
        result = message["result"]
        assert not result.get("isError"), result
        did: str = result["structuredContent"]["result"]["did"]
        return did


async def official_session(stack: LoadStack, key: str) -> list[str]:
    """One session through the official client (legacy mode): whoami twice."""
    async with httpx2.AsyncClient(headers={"X-API-Key": key}, timeout=REQUEST_TIMEOUT) as http:
        transport = streamable_http_client(stack.mcp_url, http_client=http)
        async with Client(transport, mode="legacy") as client:
            seen = []
            for request_id in range(2):
                result = await client.call_tool(
                    "anp_invokeOpenRPC",
                    {"endpoint": stack.rpc_url, "method": "whoami", "request_id": request_id},
                )
                assert not result.is_error, result.content
                assert result.structured_content is not None
                seen.append(result.structured_content["result"]["did"])
            return seen


PER_SESSION_TYPES = (SessionState, ANPToolHandler, SessionCrawler, SessionSigner)


async def machinery_released(stack: LoadStack) -> None:
    """Wait (a few loop turns) for the MCP machinery of ended requests to finish unwinding:
    it is released when a request ends, and its task then winds down on its own."""
    endpoint = stack.middleware.endpoint
    for _ in range(1000):
        if not endpoint.running:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"MCP machinery still running: {endpoint.running}")


def per_session_objects() -> int:
    """Live objects of the kinds each session owns (a census; tracemalloc would triple the run)."""
    gc.collect()
    return sum(isinstance(o, PER_SESSION_TYPES) for o in gc.get_objects())


async def test_hundreds_of_concurrent_sessions_then_everything_expires(tmp_path: Path) -> None:
    clock = ManualClock()
    keys_by_session: dict[str, str] = {}
    async with load_stack(tmp_path, clock) as stack:
        registry = stack.middleware.registry
        store = registry.store
        assert isinstance(store, InMemorySessionStore)
        keys = list(stack.dids)
        # The client lets an idle connection go well before uvicorn closes it (5 s): reused at
        # the moment the server closes it, a request fails on the wire (a client-side race).
        limits = httpx.Limits(
            max_connections=CLIENT_CONCURRENCY,
            max_keepalive_connections=CLIENT_CONCURRENCY,
            keepalive_expiry=2.0,
        )
        async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as http:
            client = RawClient(stack, http, CLIENT_CONCURRENCY)

            # Warm-up: every key's credential loaded, pools and lazy caches filled; the
            # warm-up sessions then expire and leave no per-session object behind.
            for key in keys:
                session_id = await client.open_session(key)
                assert await client.whoami(key, session_id, 1) == stack.dids[key]
            clock.advance(SESSION_TIMEOUT + 1)
            assert await registry.sweep() == len(keys)
            await machinery_released(stack)
            assert per_session_objects() == 0

            # Phase 1: open every session; all of them are alive at once afterwards.
            chosen = [keys[i % len(keys)] for i in range(SESSIONS)]
            opened = await asyncio.wait_for(
                asyncio.gather(*(client.open_session(key) for key in chosen)), 120
            )
            keys_by_session = dict(zip(opened, chosen, strict=True))
            assert len(keys_by_session) == SESSIONS  # all ids distinct
            assert len(store) == SESSIONS == len(registry)

            # Phase 2: every session calls whoami repeatedly, interleaved with the others
            # (and with a few official-client sessions running at the same time).
            async def calls(session_id: str, key: str) -> list[str]:
                return [
                    await client.whoami(key, session_id, request_id)
                    for request_id in range(2, 2 + CALLS_PER_SESSION)
                ]

            official_keys = keys[:OFFICIAL_SESSIONS]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(calls(sid, key) for sid, key in keys_by_session.items()),
                    *(official_session(stack, key) for key in official_keys),
                ),
                120,
            )
        raw_results, official_results = results[:SESSIONS], results[SESSIONS:]

        # Zero failures (each request asserted above), each session saw its own DID.
        for (session_id, key), seen in zip(keys_by_session.items(), raw_results, strict=True):
            assert seen == [stack.dids[key]] * CALLS_PER_SESSION, session_id
        for key, seen in zip(official_keys, official_results, strict=True):
            assert seen == [stack.dids[key]] * 2
        assert client.requests == len(keys) * 3 + SESSIONS * (2 + CALLS_PER_SESSION)
        assert not registry.stats.rejected
        assert registry.stats.created == len(keys) + SESSIONS + OFFICIAL_SESSIONS
        assert registry.in_flight == 0
        # The official client closed its sessions (DELETE); the raw ones are all alive.
        assert len(store) == SESSIONS
        assert set(keys_by_session) == {r.session_id for r in store.records()}

        states = registry.live_sessions()
        assert {s.session_id for s in states} == set(keys_by_session)
        assert all(s.attachment(ATTACHMENT) is not None and s.in_flight == 0 for s in states)
        refs = [weakref.ref(s) for s in states]
        assert per_session_objects() >= len(PER_SESSION_TYPES) * SESSIONS  # the census sees them
        del states, results, raw_results

        # Past the idle timeout: one sweep removes every session and frees its objects.
        clock.advance(SESSION_TIMEOUT + 1)
        assert await registry.sweep() == SESSIONS
        assert len(store) == 0 and len(registry) == 0
        assert await registry.store.count(now=clock()) == 0
        await machinery_released(stack)
        gc.collect()
        assert not [ref for ref in refs if ref() is not None]
        assert per_session_objects() == 0  # handlers, crawlers, signers released too
        assert not registry._busy and not registry._live

        # The server is still healthy: an expired session is refused, a new one works.
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
            client = RawClient(stack, http, 1)
            key, session_id = keys[0], next(iter(keys_by_session))
            expired = await client.post(
                {"jsonrpc": "2.0", "id": 9, "method": "ping"},
                client.session_headers(keys_by_session[session_id], session_id),
            )
            assert expired.status_code == 404
            fresh = await client.open_session(key)
            assert await client.whoami(key, fresh, 1) == stack.dids[key]
