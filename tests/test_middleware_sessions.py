"""Session lifecycle driven as a client would: httpx over ASGITransport, around real ASGI apps."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcp2anp_middleware import Credentials, MCPSessionMiddleware, SessionConfig, SessionState
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.ids import MAX_SESSION_ID_LENGTH
from mcp2anp_middleware.sessions.middleware import SESSION_SCOPE_KEY
from mcp2anp_middleware.sessions.policy import RequestLimits, SessionPolicy
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores import InMemorySessionStore, SessionRecord

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT
from .messages import PING

pytestmark = pytest.mark.anyio

TIMEOUT = 60.0
POLICY = SessionPolicy(timeout=TIMEOUT, cleanup_interval=10)
ANON = SessionConfig()


def build(
    clock: ManualClock | None = None, **options: Any
) -> tuple[MCPSessionMiddleware, RecordingMCPApp, HostApp]:
    inner, host = RecordingMCPApp(), HostApp()
    middleware = MCPSessionMiddleware(
        host,
        mcp_app=inner,
        clock=clock or ManualClock(),
        **{"policy": POLICY, **options},
    )
    return middleware, inner, host


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def initialize(client: httpx.AsyncClient) -> str:
    response = await client.post("/mcp", json=INIT)
    assert response.status_code == 200, response.text
    return response.headers["mcp-session-id"]


def assert_jsonrpc_error(response: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body


async def test_initialize_creates_session_and_returns_its_id() -> None:
    middleware, inner, _ = build()
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json=INIT)
    session_id = response.headers["mcp-session-id"]
    assert session_id != "inner-app-id"  # the middleware's id replaces any the app set
    assert len(response.headers.get_list("mcp-session-id")) == 1
    assert "Mcp-Session-Id" in response.headers["access-control-expose-headers"]
    assert len(session_id) >= 22 and all(0x21 <= ord(c) <= 0x7E for c in session_id)
    assert len(middleware.registry) == 1
    state = inner.seen[0]
    assert isinstance(state, SessionState) and state.session_id == session_id
    assert response.json()["result"]["session"] == session_id


async def test_known_id_is_reused_and_touched() -> None:
    clock = ManualClock()
    middleware, inner, _ = build(clock)
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        created = await middleware.registry.get(session_id, ANON)
        assert created is not None
        clock.advance(30)
        response = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
    assert response.status_code == 200
    assert "mcp-session-id" not in response.headers  # minted once, on initialize
    assert inner.seen[1] is created
    assert created.last_accessed == clock.now
    assert created.created_at == clock.now - 30


async def test_two_sessions_are_isolated() -> None:
    middleware, inner, _ = build()
    async with client_for(middleware) as client:
        first, second = await initialize(client), await initialize(client)
        assert first != second
        await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": second})
        await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": first})
    assert [s.session_id for s in inner.seen] == [first, second, second, first]
    assert inner.seen[0] is not inner.seen[1]


async def test_state_is_readable_from_starlette_request_state() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        state = request.state.mcp_session
        assert request.scope["state"][SESSION_SCOPE_KEY] is state
        return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": state.session_id})

    inner = Starlette(routes=[Route("/mcp", endpoint, methods=["POST"])])
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=inner, clock=ManualClock())
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json=INIT)
    assert response.json()["result"] == response.headers["mcp-session-id"]


async def test_unknown_id_is_404_with_jsonrpc_body() -> None:
    middleware, inner, _ = build()
    async with client_for(middleware) as client:
        response = await client.post(
            "/mcp", json=PING, headers={"Mcp-Session-Id": "x" * MAX_SESSION_ID_LENGTH}
        )
    body = assert_jsonrpc_error(response, 404, -32600)
    assert body["id"] == 2
    assert inner.seen == []


class CountingStore(InMemorySessionStore):
    """The memory store, counting lookups."""

    lookups = 0

    async def read(self, session_id: str) -> SessionRecord | None:
        self.lookups += 1
        return await super().read(session_id)


@pytest.mark.parametrize(
    "bad_id",
    ["has space", "x" * (MAX_SESSION_ID_LENGTH + 1), "caf\u00e9", "tab\there", ""],
)
async def test_malformed_id_is_400_without_touching_the_store(bad_id: str) -> None:
    store = CountingStore()
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=RecordingMCPApp(), store=store, clock=ManualClock()
    )
    async with client_for(middleware) as client:
        response = await client.post(
            "/mcp", json=PING, headers=[(b"Mcp-Session-Id", bad_id.encode("utf-8"))]
        )
    assert_jsonrpc_error(response, 400, -32600)
    assert store.lookups == 0


async def test_repeated_session_header_is_400() -> None:
    middleware, _, _ = build()
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        response = await client.post(
            "/mcp",
            json=PING,
            headers=[("Mcp-Session-Id", session_id), ("Mcp-Session-Id", session_id)],
        )
    assert_jsonrpc_error(response, 400, -32600)


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
async def test_missing_id_on_non_initialize_is_400(method: str) -> None:
    middleware, inner, _ = build()
    async with client_for(middleware) as client:
        if method == "POST":
            response = await client.post("/mcp", json=PING)
        else:
            response = await client.request(method, "/mcp")
    assert_jsonrpc_error(response, 400, -32600)
    assert len(middleware.registry) == 0 and inner.seen == []


async def test_non_json_body_without_session_is_parse_error() -> None:
    middleware, _, _ = build()
    async with client_for(middleware) as client:
        response = await client.post("/mcp", content=b"{not json")
    assert_jsonrpc_error(response, 400, -32700)
    assert len(middleware.registry) == 0


async def test_a_json_null_body_is_an_invalid_request_not_a_parse_error() -> None:
    middleware, _, _ = build()
    async with client_for(middleware) as client:
        response = await client.post("/mcp", content=b" null ")
    assert_jsonrpc_error(response, 400, -32600)
    assert len(middleware.registry) == 0


async def test_oversize_body_is_413_and_creates_nothing() -> None:
    middleware, inner, _ = build(limits=RequestLimits(max_body_size=1024))
    async with client_for(middleware) as client:
        big = {**INIT, "params": {"pad": "x" * 2048}}
        response = await client.post("/mcp", json=big)

        async def chunks() -> Any:  # no content-length: the limit applies while reading
            yield b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"pad":"'
            for _ in range(10):
                yield b"x" * 200
            yield b'"}}'

        streamed = await client.post("/mcp", content=chunks())
    assert_jsonrpc_error(response, 413, -32600)
    assert_jsonrpc_error(streamed, 413, -32600)
    assert len(middleware.registry) == 0 and inner.seen == []


async def test_rejected_initialize_creates_no_session() -> None:
    middleware, _inner, _ = build()
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json={**INIT, "params": {"reject": True}})
    assert response.status_code == 400
    assert "mcp-session-id" not in response.headers
    assert len(middleware.registry) == 0
    assert middleware.registry.stats.created == 0


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
async def test_no_session_for_get_delete_options(method: str) -> None:
    middleware, inner, _ = build()
    async with client_for(middleware) as client:
        response = await client.request(method, "/mcp")
    if method == "OPTIONS":  # a CORS preflight goes to the app, which answers it
        assert response.status_code == 204 and inner.seen == [None]
    else:
        assert_jsonrpc_error(response, 400, -32600)
        assert inner.seen == []
    assert len(middleware.registry) == 0
    assert await middleware.registry.store.count(now=0) == 0


async def test_a_failing_authenticator_is_logged_without_its_frames_locals() -> None:
    """The traceback goes to the log as plain text, not as ``exc_info``, which a renderer with
    ``rich`` prints with every frame's locals (here, the credential being checked)."""

    async def broken(credentials: Credentials) -> SessionConfig:
        secret = credentials.api_key
        raise RuntimeError(f"verifier bug ({len(secret or '')} characters)")

    middleware, _, _ = build(authenticator=broken)
    with structlog.testing.capture_logs() as logs:
        async with client_for(middleware) as client:
            answer = await client.post("/mcp", json=INIT, headers={"X-API-Key": "k" * 24})
    assert answer.status_code == 503
    (failed,) = [entry for entry in logs if entry["event"] == "Authenticator failed"]
    assert "exc_info" not in failed and failed["log_level"] == "error"
    assert "RuntimeError: verifier bug (24 characters)" in failed["exception"]
    assert "k" * 24 not in repr(logs)


async def test_delete_ends_session_then_404() -> None:
    middleware, _, _ = build()
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        with structlog.testing.capture_logs() as logs:
            deleted = await client.delete("/mcp", headers={"Mcp-Session-Id": session_id})
        after = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
    assert deleted.status_code == 204
    assert_jsonrpc_error(after, 404, -32600)
    assert len(middleware.registry) == 0
    events = [entry["event"] for entry in logs]
    assert "Session closed by client DELETE request" in events
    assert "Session removed" in events


async def test_idle_session_expires_by_clock() -> None:
    clock = ManualClock()
    middleware, _, _ = build(clock)
    async with client_for(middleware) as client:
        kept, dropped = await initialize(client), await initialize(client)
        clock.advance(TIMEOUT - 1)
        await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": kept})
        clock.advance(2)  # dropped is now idle TIMEOUT + 1, kept only 2
        assert await middleware.registry.sweep() == 1
        assert kept in middleware.registry and dropped not in middleware.registry
        response = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": dropped})
        assert_jsonrpc_error(response, 404, -32600)


async def test_expired_session_is_refused_even_before_the_sweep_runs() -> None:
    clock = ManualClock()
    middleware, _, _ = build(clock)
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        clock.advance(TIMEOUT + 1)
        response = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
    assert_jsonrpc_error(response, 404, -32600)
    assert len(middleware.registry) == 0


async def test_in_flight_request_survives_sweep_past_its_timeout() -> None:
    clock = ManualClock()
    middleware, inner, _ = build(clock)
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        blocked = asyncio.create_task(
            client.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 3, "method": "block"},
                headers={"Mcp-Session-Id": session_id},
            )
        )
        await inner.started.wait()
        clock.advance(TIMEOUT * 3)
        assert await middleware.registry.sweep() == 0
        assert session_id in middleware.registry
        inner.release.set()
        assert (await blocked).status_code == 200
        # idle time counts from the end of the request: still alive just under the timeout
        clock.advance(TIMEOUT - 1)
        assert await middleware.registry.sweep() == 0
        clock.advance(2)
        assert await middleware.registry.sweep() == 1


async def test_open_sse_stream_keeps_session_alive() -> None:
    clock = ManualClock()
    middleware, inner, _ = build(clock)
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        stream = asyncio.create_task(client.get("/mcp", headers={"Mcp-Session-Id": session_id}))
        await inner.started.wait()
        clock.advance(TIMEOUT * 10)
        assert await middleware.registry.sweep() == 0
        assert await middleware.registry.get(session_id, ANON) is not None
        inner.release.set()
        assert (await stream).status_code == 200
        clock.advance(TIMEOUT + 1)
        assert await middleware.registry.sweep() == 1


async def test_max_session_age_bounds_an_active_session() -> None:
    clock = ManualClock()
    middleware, _, _ = build(clock, policy=replace(POLICY, max_age=100))
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        for _ in range(2):  # busy, never idle long
            clock.advance(40)
            ok = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
            assert ok.status_code == 200
        clock.advance(30)  # 110 s old, idle only 30 s
        with structlog.testing.capture_logs() as logs:
            response = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
    assert_jsonrpc_error(response, 404, -32600)
    assert [e["reason"] for e in logs if e["event"] == "Session removed"] == ["max_age"]


async def test_max_session_age_sweep_waits_for_in_flight_request() -> None:
    clock = ManualClock()
    middleware, inner, _ = build(clock, policy=replace(POLICY, max_age=100))
    async with client_for(middleware) as client:
        session_id = await initialize(client)
        blocked = asyncio.create_task(
            client.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 3, "method": "block"},
                headers={"Mcp-Session-Id": session_id},
            )
        )
        await inner.started.wait()
        clock.advance(101)
        assert await middleware.registry.sweep() == 0
        assert session_id in middleware.registry
        inner.release.set()
        assert (await blocked).status_code == 200
    assert session_id not in middleware.registry  # removed when its last request ended


async def test_large_sweep_yields_to_the_event_loop() -> None:
    clock = ManualClock()
    store = InMemorySessionStore(batch=10)
    registry = SessionRegistry(store=store, clock=clock, session_timeout=TIMEOUT)
    for _ in range(100):
        await registry.register(registry.new_session(_config()))
    clock.advance(TIMEOUT + 1)
    progress: list[int] = []

    async def observer() -> None:
        while True:
            progress.append(len(store))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(observer())
    await asyncio.sleep(0)
    assert await registry.sweep() == 100
    watcher.cancel()
    # the observer ran between batches and saw the store part-way through the sweep
    assert any(0 < count < 100 for count in progress)


async def test_sweep_stops_at_first_live_session() -> None:
    """Live sessions are never visited: the deadline order puts them behind the expired ones.
    The store counts the records its expiry looks at; a full scan would look at all ten."""
    clock = ManualClock()
    store = InMemorySessionStore()
    visits = CountingDict()
    store._records = visits
    registry = SessionRegistry(store=store, clock=clock, session_timeout=TIMEOUT)
    old = [registry.new_session(_config()) for _ in range(5)]
    for state in old:
        await registry.register(state)
    clock.advance(TIMEOUT)
    live = [registry.new_session(_config()) for _ in range(5)]
    for state in live:
        await registry.register(state)
    await registry.acquire(old[0])  # used again: moves behind the others
    await registry.release(old[0])
    clock.advance(2)
    visits.gets = 0
    assert await registry.sweep() == 4
    assert visits.gets <= 5  # the four expired, and old[0]'s superseded deadline
    assert old[0].session_id in registry
    assert all(state.session_id in registry for state in live)


class CountingDict(dict[str, SessionRecord]):
    """The store's record table, counting lookups by id."""

    gets = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.gets += 1
        return super().get(key, default)


def _config() -> Any:
    from mcp2anp_middleware import SessionConfig

    return SessionConfig()


async def test_a_new_sessions_id_is_added_to_a_copy_of_the_apps_headers() -> None:
    """An app may send one headers list with every response: the new id must not stay in it
    (for the next response, a session's or not, to carry)."""
    shared = [(b"content-type", b"application/json"), (b"access-control-expose-headers", b"X-A")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": shared})
        body = b'{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-11-25"}}'
        await send({"type": "http.response.body", "body": body})

    middleware = MCPSessionMiddleware(HostApp(), mcp_app=app, clock=ManualClock(), policy=POLICY)
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json=INIT)
    assert response.status_code == 200 and response.headers["mcp-session-id"]
    assert response.headers["access-control-expose-headers"] == "X-A, Mcp-Session-Id"
    assert shared == [
        (b"content-type", b"application/json"),
        (b"access-control-expose-headers", b"X-A"),
    ]
