"""Issue 10, second hardening round: refusals are cheap, bounded, and leave the store untouched.

Each test drives the middleware as a client would (httpx over ASGI, or real uvicorn on loopback)
and fails on the code before the fix: a refused session-less request or a handshake refused during
a Redis stall left a session behind, repeated ``Origin`` and credential headers were served, a
refusal read the whole body first, a slow body was waited for forever, a request cut short by
shutdown got a plain-text 500, and an infinite timeout was accepted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message

from mcp2anp_middleware import AuthenticationError, Credentials, MCPSessionMiddleware, SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import RequestLimits, SessionPolicy
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores import InMemorySessionStore, SessionStore
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT
from .messages import PING
from .redis_server import RedisServer
from .servers import uvicorn_server

pytestmark = pytest.mark.anyio

SESSIONLESS = {"MCP-Protocol-Version": "2026-07-28"}
ALICE = SessionConfig(principal="alice")


async def alice_only(credentials: Credentials) -> SessionConfig:
    if credentials.api_key != "alice":
        raise AuthenticationError("Unknown API key")
    return ALICE


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield InMemorySessionStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisSessionStore.from_url(server.url, prefix=f"trace-{os.urandom(4).hex()}:")
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


def middleware_on(store: SessionStore, **options: Any) -> MCPSessionMiddleware:
    return MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        store=store,
        authenticator=alice_only,
        clock=ManualClock(),
        **options,
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def sessions_in(middleware: MCPSessionMiddleware) -> int:
    registry = middleware.registry
    return await registry.store.count(now=registry.clock())


# -- 1. a refused session-less request creates nothing ------------------------------------------


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("POST", b"this is not json", 400),
        ("POST", b'{"hello": "world"}', 400),  # JSON, not JSON-RPC
        ("POST", b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', 400),  # no batches
        ("POST", json.dumps({**PING, "params": {"reject": True}}).encode(), 400),  # app refuses
        ("GET", b"", 405),
        ("DELETE", b"", 405),
    ],
)
async def test_refused_sessionless_requests_leave_the_store_unchanged(
    store: SessionStore, method: str, body: bytes, status: int
) -> None:
    middleware = middleware_on(store, policy=SessionPolicy(per_principal_cap=1))
    async with client_for(middleware) as client:
        headers = {**SESSIONLESS, "X-API-Key": "alice", "Content-Type": "application/json"}
        request = client.request(method, "/mcp", content=body, headers=headers)
        refused = await asyncio.wait_for(request, 10)
        assert refused.status_code == status, refused.text
        assert refused.json()["jsonrpc"] == "2.0"
        assert await sessions_in(middleware) == 0
        # The principal is not locked out of a handshake by the refused request.
        opened = await client.post("/mcp", json=INIT, headers={"X-API-Key": "alice"})
        assert opened.status_code == 200, opened.text
    await middleware.shutdown()


async def test_a_served_sessionless_request_keeps_its_implicit_session(
    store: SessionStore,
) -> None:
    middleware = middleware_on(store)
    async with client_for(middleware) as client:
        headers = {**SESSIONLESS, "X-API-Key": "alice"}
        served = await client.post("/mcp", json=PING, headers=headers)
        assert served.status_code == 200 and "mcp-session-id" not in served.headers
        assert await sessions_in(middleware) == 1
        assert middleware.registry.stats.created == 1
    await middleware.shutdown()


# -- 2. a handshake refused while Redis stalls leaves nothing behind ----------------------------


async def test_a_handshake_refused_during_a_redis_stall_leaves_no_session(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "stalled")
    server.start()
    store = RedisSessionStore.from_url(server.url, prefix="stall:", timeout=0.3)
    middleware = middleware_on(store, policy=SessionPolicy(per_principal_cap=1))
    assert server.process is not None
    try:
        async with client_for(middleware) as client:
            assert await store.ping()  # a pooled connection exists before the stall
            server.process.send_signal(signal.SIGSTOP)
            try:
                refused = await client.post("/mcp", json=INIT, headers={"X-API-Key": "alice"})
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == -32603
            # Redis now runs what was queued during the stall (the create script among it);
            # the middleware's compensation must still leave no session behind.
            assert await middleware.registry.settle(10.0)
            assert await store.client.keys("stall:s:*") == []
            assert await sessions_in(middleware) == 0
            opened = await client.post("/mcp", json=INIT, headers={"X-API-Key": "alice"})
            assert opened.status_code == 200, opened.text
    finally:
        await middleware.shutdown()
        server.stop()


async def test_a_new_session_is_only_a_short_reservation_until_its_answer_commits(
    redis_server: RedisServer,
) -> None:
    """Until ``initialize`` is answered the record lives seconds, not a whole idle timeout."""
    store = RedisSessionStore.from_url(redis_server.url, prefix="reserve:")
    middleware = MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        store=store,
        clock=ManualClock(),
        policy=SessionPolicy(timeout=3600),
    )
    try:
        async with client_for(middleware) as client:
            answered = await client.post("/mcp", json=INIT)
            session_id = answered.headers["mcp-session-id"]
            assert await store.client.pttl(f"reserve:s:{session_id}") > 3000 * 1000

            registry = middleware.registry
            state = registry.new_session(ALICE)
            await registry.register(state, reservation=5.0)
            reserved = await store.client.pttl(f"reserve:s:{state.session_id}")
            assert 0 < reserved <= 5000
            await registry.commit(state)
            assert await store.client.pttl(f"reserve:s:{state.session_id}") > 3000 * 1000
    finally:
        await middleware.shutdown()


# -- 6. repeated Origin (and credential) headers ------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [
            ("Origin", "https://evil.example"),
            ("Origin", "https://app.example"),
            ("X-API-Key", "alice"),
        ],
        [
            ("Origin", "https://app.example"),
            ("Origin", "https://app.example"),
            ("X-API-Key", "alice"),
        ],
        [("X-API-Key", "mallory"), ("X-API-Key", "alice")],
        [("Authorization", "Bearer mallory"), ("X-API-Key", "alice")],
    ],
)
async def test_repeated_origin_or_credential_headers_are_refused(
    headers: list[tuple[str, str]],
) -> None:
    middleware = middleware_on(
        InMemorySessionStore(), limits=RequestLimits(allowed_origins=["https://app.example"])
    )
    async with client_for(middleware) as client:
        refused = await client.post("/mcp", json=INIT, headers=headers)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == -32600
    assert await sessions_in(middleware) == 0


# -- 9. refusals before authentication never read the body --------------------------------------


class CountingBody:
    """An ASGI ``receive`` for a large body that counts how much of it was read."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.read = 0

    async def __call__(self) -> Message:
        chunk = min(self.remaining, 64 * 1024)
        self.remaining -= chunk
        self.read += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": self.remaining > 0}


async def drive(
    app: MCPSessionMiddleware, headers: list[tuple[bytes, bytes]], receive: Any
) -> tuple[int, dict[str, Any]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.parametrize("credential", [[], [(b"x-api-key", b"mallory")]])
async def test_unauthenticated_refusals_do_not_read_the_body(
    credential: list[tuple[bytes, bytes]],
) -> None:
    middleware = middleware_on(InMemorySessionStore())
    body = CountingBody(4 * 1024 * 1024)
    status, answer = await drive(middleware, credential, body)
    assert status == 401 and answer["error"]["code"] == -32001
    assert body.read == 0
    await middleware.shutdown()


# -- 10. a body that never finishes arriving is answered 408 ------------------------------------


async def test_a_slow_drip_body_is_answered_408() -> None:
    middleware = middleware_on(InMemorySessionStore(), limits=RequestLimits(body_timeout=0.05))
    dripped = asyncio.Event()

    async def drip() -> Message:
        if not dripped.is_set():
            dripped.set()
            return {"type": "http.request", "body": b'{"jsonrpc"', "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    status, answer = await asyncio.wait_for(
        drive(middleware, [(b"x-api-key", b"alice")], drip), timeout=10
    )
    assert status == 408 and answer["error"]["code"] == -32600
    assert await sessions_in(middleware) == 0
    await middleware.shutdown()


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_body_timeout_must_be_finite_and_positive(value: float) -> None:
    with pytest.raises(ValueError, match="body_timeout"):
        MCPSessionMiddleware(HostApp(), limits=RequestLimits(body_timeout=value))


# -- 11. shutdown in the middle of a request ----------------------------------------------------


async def test_a_request_cut_short_by_shutdown_gets_a_jsonrpc_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real uvicorn, its graceful-shutdown timeout shorter than the request: the client gets a
    JSON-RPC 503 instead of uvicorn's plain-text 500, and the log has no traceback."""
    inner = RecordingMCPApp()
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=inner, shutdown_grace=0.1)
    caplog.set_level(logging.INFO)
    async with (
        uvicorn_server(middleware, graceful_timeout=0.2) as (base_url, server),
        httpx.AsyncClient(base_url=base_url) as client,
    ):
        opened = await client.post("/mcp", json=INIT)
        session_id = opened.headers["mcp-session-id"]
        blocked = {"jsonrpc": "2.0", "id": 5, "method": "block"}
        call = asyncio.create_task(
            client.post("/mcp", json=blocked, headers={"Mcp-Session-Id": session_id})
        )
        await asyncio.wait_for(inner.started.wait(), 10)
        server.should_exit = True
        answer = await asyncio.wait_for(call, 10)
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"]["code"] == -32603 and answer.json()["id"] == 5
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"


# -- 12. timeouts the stores cannot represent are refused at construction -----------------------


@pytest.mark.parametrize("field", ["session_timeout", "max_session_age", "touch_interval"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 1e300])
def test_unrepresentable_durations_are_refused_at_start(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SessionRegistry(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        name = {"session_timeout": "timeout", "max_session_age": "max_age"}.get(field, field)
        MCPSessionMiddleware(HostApp(), policy=SessionPolicy(**{name: value}))  # type: ignore[arg-type]
