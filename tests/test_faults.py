"""Faults: clients that vanish, sweeps racing requests, Redis restarted and a worker killed.

Every wait is bounded; nothing asserts a duration. Expiry is driven by a ``ManualClock`` and
explicit sweeps, except in the two-process test, which only checks that sessions survive.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.server.mcpserver import MCPServer
from starlette.types import Message, Receive, Scope, Send

from mcp2anp_middleware import (
    AuthenticationError,
    Credentials,
    MCPSessionMiddleware,
    SessionConfig,
    ensure_dev_identity,
)
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.events import SessionEventKind
from mcp2anp_middleware.sessions.middleware import SESSION_SCOPE_KEY
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.state import SessionState
from mcp2anp_middleware.sessions.stores import (
    Caps,
    CreateOutcome,
    InMemorySessionStore,
    SessionRecord,
)
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .anp_stack import API_KEYS, anp_stack
from .inner_apps import HostApp
from .messages import INITIALIZE as INIT
from .messages import MCP_HEADERS as ACCEPT
from .messages import PROTOCOL, answer_of
from .processes import launcher
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

TIMEOUT = 60.0  # session idle timeout (seconds of the manual clock)
WAIT = 20.0  # upper bound of any single wait in these tests (real seconds)
ALICE, BOB = list(API_KEYS)


async def by_key(credentials: Credentials) -> SessionConfig:
    if credentials.api_key in ("alice", "bob"):
        return SessionConfig(principal=credentials.api_key)
    raise AuthenticationError("unknown API key")


async def eventually(predicate: Callable[[], bool], what: str, limit: float = WAIT) -> None:
    """Poll ``predicate`` until it holds (bounded); for effects of another task or process."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- ASGI-level driving -----------------------------------------------------------------------


class GatedApp:
    """A JSON MCP endpoint whose requests can be held open and that checks its session.

    A request with JSON-RPC method ``block`` (or ``params.block``) waits until its id's gate
    opens; ``listen`` answers 200 at once with an open body and then waits for the client to
    disconnect (like an SSE stream); ``explode`` raises. At the start and the end of each request
    ``check`` is asked whether the request's session is still there; the answers go to
    ``observed``.
    """

    def __init__(self) -> None:
        self.gates: dict[Any, asyncio.Event] = {}
        self.entered: dict[Any, asyncio.Event] = {}
        self.observed: list[tuple[Any, str, bool]] = []
        self.check: Callable[[SessionState], Awaitable[bool]] | None = None

    def gate(self, request_id: Any) -> asyncio.Event:
        return self.gates.setdefault(request_id, asyncio.Event())

    def entry(self, request_id: Any) -> asyncio.Event:
        return self.entered.setdefault(request_id, asyncio.Event())

    async def _observe(self, request_id: Any, when: str, state: SessionState | None) -> None:
        if state is None or self.check is None:
            return
        self.observed.append((request_id, when, not state.closed and await self.check(state)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {}).get(SESSION_SCOPE_KEY)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        request_id, method = request.get("id"), request.get("method")
        await self._observe(request_id, "start", state)
        self.entry(request_id).set()
        headers = [(b"content-type", b"application/json")]
        if method == "explode":
            raise RuntimeError("the app failed")
        if method == "listen":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        if method == "block" or (request.get("params") or {}).get("block"):
            await self.gate(request_id).wait()
        await self._observe(request_id, "end", state)
        data = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Exchange:
    """One request driven straight into an ASGI app, with the client's side under test control."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    truncate: bool = False  # send half the body, then disconnect
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response: bytes = b""
    disconnect: asyncio.Event = field(default_factory=asyncio.Event)

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None  # type: ignore[assignment]
            if self.truncate:
                return {"type": "http.request", "body": body[: len(body) // 2], "more_body": True}
            return {"type": "http.request", "body": body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.response_headers = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]
            }
        else:
            self.response += message.get("body", b"")

    def json(self) -> Any:
        return json.loads(self.response)


def exchange(
    payload: dict[str, Any] | None,
    *,
    key: str = "alice",
    session_id: str | None = None,
    method: str = "POST",
    truncate: bool = False,
) -> tuple[Scope, Exchange]:
    headers = [(b"x-api-key", key.encode()), (b"content-type", b"application/json")]
    if session_id is not None:
        headers.append((b"mcp-session-id", session_id.encode()))
    body = json.dumps(payload).encode() if payload is not None else b""
    headers.append((b"content-length", str(len(body)).encode()))
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    return scope, Exchange(body, headers, truncate=truncate)


async def drive(app: Any, payload: dict[str, Any] | None, **options: Any) -> Exchange:
    """Run one request to completion (bounded)."""
    scope, ex = exchange(payload, **options)
    await asyncio.wait_for(app(scope, ex.receive, ex.send), WAIT)
    return ex


def start(app: Any, payload: dict[str, Any], **options: Any) -> tuple[asyncio.Task[None], Exchange]:
    """Start one request in the background; the caller ends it."""
    scope, ex = exchange(payload, **options)
    return asyncio.create_task(app(scope, ex.receive, ex.send)), ex


def rpc(method: str, request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method}


async def open_session(app: Any, key: str = "alice") -> str:
    created = await drive(app, {"jsonrpc": "2.0", "id": 0, "method": "initialize"}, key=key)
    assert created.status == 200, created.response
    return created.response_headers["mcp-session-id"]


def middleware_with(app: Any, **options: Any) -> MCPSessionMiddleware:
    options.setdefault("clock", ManualClock())
    return MCPSessionMiddleware(
        HostApp(),
        mcp_app=app,
        authenticator=by_key,
        policy=SessionPolicy(timeout=TIMEOUT),
        **options,
    )


async def until_entered(
    inner: GatedApp, request_id: Any, task: asyncio.Task[None], ex: Exchange
) -> None:
    """Wait until the request reached the app; fail with its answer if it was refused instead."""
    entered = asyncio.ensure_future(inner.entry(request_id).wait())
    await asyncio.wait({entered, task}, timeout=WAIT, return_when="FIRST_COMPLETED")
    entered.cancel()
    assert inner.entry(request_id).is_set(), (
        f"request {request_id} refused: {ex.status} {ex.response!r}"
    )


# -- a. clients that go away ------------------------------------------------------------------


async def test_requests_ending_without_an_answer_release_their_in_flight_marks() -> None:
    """Disconnected, cancelled, failed and normal requests on one session all count down."""
    clock = ManualClock()
    inner = GatedApp()
    middleware = middleware_with(inner, clock=clock)
    registry = middleware.registry
    session_id = await open_session(middleware)
    requests = {
        "disconnect": start(middleware, rpc("listen", 1), session_id=session_id),
        "cancel": start(middleware, rpc("block", 2), session_id=session_id),
        "answered": start(middleware, rpc("block", 3), session_id=session_id),
    }
    for request_id, (task, ex) in enumerate(requests.values(), start=1):
        await until_entered(inner, request_id, task, ex)
    assert registry.in_flight == 3

    clock.advance(TIMEOUT + 1)  # long requests: the session must outlive them all
    assert await registry.sweep() == 0

    task, ex = requests["disconnect"]
    ex.disconnect.set()  # the server reports http.disconnect to the streaming app
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 200 and registry.in_flight == 2

    task, _ = requests["cancel"]
    task.cancel()  # the server cancels the request (what a worker does on hard shutdown)
    await asyncio.wait_for(task, WAIT)  # answered, not re-raised: no traceback, no plain 500
    assert registry.in_flight == 1

    with pytest.raises(RuntimeError, match="the app failed"):
        await drive(middleware, rpc("explode", 4), session_id=session_id)
    assert registry.in_flight == 1

    task, ex = requests["answered"]
    inner.gate(3).set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 200

    assert registry.in_flight == 0 and not registry._busy
    assert await registry.wait_idle(0)  # a graceful shutdown would not wait for them
    assert session_id in registry  # idle time starts at the end of the last request
    assert await registry.sweep() == 0
    assert (await drive(middleware, rpc("ping", 5), session_id=session_id)).status == 200

    clock.advance(TIMEOUT + 1)  # and then it expires like any idle session
    assert await registry.sweep() == 1
    assert session_id not in registry
    assert (await drive(middleware, rpc("ping", 6), session_id=session_id)).status == 404
    await middleware.shutdown()


async def test_cancelled_or_abandoned_handshakes_leave_no_session() -> None:
    inner = GatedApp()
    middleware = middleware_with(inner)
    registry = middleware.registry
    task, ex = start(middleware, {**INIT, "id": 7, "params": {"block": True}})
    await until_entered(inner, 7, task, ex)
    assert len(registry) == 1 and registry.in_flight == 1  # reserved while the app runs
    task.cancel()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 503 and ex.json()["error"]["code"] == -32603 and ex.json()["id"] == 7
    assert len(registry) == 0 and registry.in_flight == 0 and registry.stats.created == 0

    # The client goes away while still sending its body: nothing is created or held.
    task, ex = start(middleware, INIT, truncate=True)
    await asyncio.sleep(0)
    ex.disconnect.set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status is None  # nobody to answer
    session_id = await open_session(middleware)
    task, ex = start(middleware, rpc("ping", 8), session_id=session_id, truncate=True)
    ex.disconnect.set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status is None and registry.in_flight == 0
    assert len(registry) == 1 and registry.stats.created == 1
    await middleware.shutdown()


class StallsOnce(InMemorySessionStore):
    """A memory store whose next creation or write (``stall``) waits until the test cancels
    it, as a shared store's round trip does; the creation is made before the wait, as Redis may
    carry out a command whose caller went away."""

    def __init__(self, stall: str) -> None:
        super().__init__()
        self.stall = stall
        self.stalled = asyncio.Event()

    async def _wait(self, step: str) -> None:
        if self.stall == step:
            self.stall = ""
            self.stalled.set()
            await asyncio.Event().wait()  # until cancelled

    async def create(self, record: SessionRecord, **options: Any) -> CreateOutcome:
        outcome = await super().create(record, **options)
        await self._wait("create")
        return outcome

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        await self._wait("write")
        return await super().write(record, ttl=ttl, now=now)


@pytest.mark.parametrize("stall", ["create", "write"])
@pytest.mark.parametrize("era", ["handshake", "implicit"])
async def test_a_creating_request_cancelled_inside_a_store_call_leaves_no_session(
    stall: str, era: str
) -> None:
    """Cancelled while the store creates the session (``create``) or writes it (``write``: the
    request's use of an implicit session, the commit of a handshake's): answered 503, and the
    store's record is removed."""
    store = StallsOnce(stall)
    middleware = middleware_with(GatedApp(), store=store)
    registry = middleware.registry
    if era == "handshake":
        task, ex = start(middleware, INIT)
    else:
        task, ex = start_session_less(middleware, 1, 200)
    await asyncio.wait_for(store.stalled.wait(), WAIT)
    assert len(store) == 1  # made, or being made
    task.cancel()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 503
    assert await registry.settle(WAIT)
    assert len(store) == 0 and len(registry) == 0
    assert registry.in_flight == 0 and registry.stats.created == 0
    await middleware.shutdown()


@pytest.mark.parametrize("store_shared", [False, True])
async def test_a_handshake_whose_session_ends_before_its_answer_is_told_to_start_again(
    store_shared: bool,
) -> None:
    """Revoked while its ``initialize`` runs: the answer is a 503 that says so, not an outage's,
    and no id goes out. With a memory store of this registry alone the commit writes nothing and
    checks the record; with one another registry shares, the commit's write finds it gone."""
    inner = GatedApp()
    store = InMemorySessionStore()
    if store_shared:
        SessionRegistry(store=store)  # (another app of this process over the same store)
    policy = SessionPolicy(timeout=TIMEOUT)
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=inner, authenticator=by_key, store=store, policy=policy
    )
    registry = middleware.registry
    task, ex = start(middleware, {**INIT, "id": 7, "params": {"block": True}})
    await until_entered(inner, 7, task, ex)
    (handshaking,) = registry.live_sessions()
    other = await open_session(middleware)
    await registry.revoke(handshaking.session_id)
    inner.gate(7).set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 503, ex.response
    assert "mcp-session-id" not in ex.response_headers
    assert ex.response_headers["retry-after"] == "1"
    error = ex.json()["error"]
    assert error["message"].startswith("Session ended before it was ready")
    assert registry.stats.rejected["session_gone"] == 1 and registry.stats.created == 1
    assert [record.session_id for record in store.records()] == [other]
    assert registry.in_flight == 0
    await middleware.shutdown()


@pytest.mark.parametrize("store_shared", [False, True])
async def test_a_handshake_under_way_is_not_evicted_and_its_answer_evicts(
    store_shared: bool,
) -> None:
    """With ``evict_oldest`` at a cap of one, a second handshake served while the first still
    runs takes nothing from it; the first, served last, then evicts the second (its principal's
    least recently used), and only then."""
    inner = GatedApp()
    store = InMemorySessionStore()
    if store_shared:
        SessionRegistry(store=store)
    policy = SessionPolicy(timeout=TIMEOUT, per_principal_cap=1, cap_policy="evict_oldest")
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=inner, authenticator=by_key, store=store, policy=policy
    )
    registry = middleware.registry
    task, ex = start(middleware, {**INIT, "id": 7, "params": {"block": True}})
    await until_entered(inner, 7, task, ex)
    other = await open_session(middleware)
    assert registry.stats.removed["evicted"] == 0
    inner.gate(7).set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 200, ex.response
    first = ex.response_headers["mcp-session-id"]
    assert [record.session_id for record in store.records()] == [first]
    assert registry.stats.removed["evicted"] == 1 and other not in registry
    await middleware.shutdown()


class HeldAnswers:
    """A session-less-era app: each request waits for its id's gate, then answers with the
    status its params name (a JSON-RPC error below 200 or from 400, a result otherwise)."""

    def __init__(self) -> None:
        self.gates: dict[Any, asyncio.Event] = {}
        self.entered: dict[Any, asyncio.Event] = {}

    def gate(self, request_id: Any) -> asyncio.Event:
        return self.gates.setdefault(request_id, asyncio.Event())

    def entry(self, request_id: Any) -> asyncio.Event:
        return self.entered.setdefault(request_id, asyncio.Event())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = json.loads((await receive())["body"])
        self.entry(request["id"]).set()
        await self.gate(request["id"]).wait()
        status = request["params"]["status"]
        outcome = {"result": {}} if status < 400 else {"error": {"code": -1, "message": "no"}}
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"], **outcome}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def event_kinds(registry: SessionRegistry) -> list[SessionEventKind]:
    """The kinds of the registry's session events from now on, as they come."""
    kinds: list[SessionEventKind] = []
    registry.subscribe(lambda event: kinds.append(event.kind))
    return kinds


def start_session_less(
    app: Any, request_id: int, status: int
) -> tuple[asyncio.Task[None], Exchange]:
    message = {"jsonrpc": "2.0", "id": request_id, "method": "x", "params": {"status": status}}
    scope, ex = exchange(message)
    scope["headers"].append((b"mcp-protocol-version", b"2026-07-28"))
    return asyncio.create_task(app(scope, ex.receive, ex.send)), ex


@pytest.mark.parametrize("second_status", [400, 200])
async def test_a_principals_implicit_session_is_kept_only_if_one_of_its_requests_is_served(
    second_status: int,
) -> None:
    """Two requests of one principal begin before its implicit session exists: the first
    creates it, the second finds it still uncommitted. Whichever is served commits it (once);
    if neither is, the last one out removes it."""
    inner = HeldAnswers()
    middleware = middleware_with(inner)
    registry = middleware.registry
    kinds = event_kinds(registry)
    first, first_ex = start_session_less(middleware, 1, 400)
    await asyncio.wait_for(inner.entry(1).wait(), WAIT)
    second, second_ex = start_session_less(middleware, 2, second_status)
    await asyncio.wait_for(inner.entry(2).wait(), WAIT)
    inner.gate(1).set()
    await asyncio.wait_for(first, WAIT)
    inner.gate(2).set()
    await asyncio.wait_for(second, WAIT)
    assert (first_ex.status, second_ex.status) == (400, second_status)
    kept = second_status < 400
    assert len(registry.store) == (1 if kept else 0)  # type: ignore[arg-type]
    assert registry.stats.created == (1 if kept else 0)
    assert kinds.count(SessionEventKind.CREATED) == (1 if kept else 0)
    assert registry.in_flight == 0
    await middleware.shutdown()


async def test_an_implicit_sessions_first_request_outliving_the_timeout_keeps_it() -> None:
    """Not yet committed, an implicit session is still renewed by the sweep while its first
    request runs, as any session a request runs on."""
    inner = HeldAnswers()
    clock = ManualClock()
    middleware = middleware_with(inner, clock=clock)
    registry = middleware.registry
    task, ex = start_session_less(middleware, 1, 200)
    await asyncio.wait_for(inner.entry(1).wait(), WAIT)
    clock.advance(3 * TIMEOUT)
    assert await registry.sweep() == 0
    inner.gate(1).set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 200 and registry.stats.created == 1
    assert len(registry.store) == 1  # type: ignore[arg-type]
    await middleware.shutdown()


class SuspendingWrites(InMemorySessionStore):
    """A memory store whose writes suspend until let through, as a shared store's do."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.fails = False
        self.let_through = asyncio.Event()
        self.began = asyncio.Event()

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        if self.holding:
            self.began.set()
            await self.let_through.wait()
            if self.fails:  # the session was removed meanwhile (by another worker)
                await self.remove(record.session_id)
        return self.write_now(record)


@pytest.mark.parametrize("commit_fails", [False, True])
async def test_an_implicit_session_served_twice_at_once_is_created_once(
    commit_fails: bool,
) -> None:
    """Both requests are served while the first commit's write is under way: the second shares
    its outcome, whether the session is created (once) or gone (both are refused)."""
    inner = HeldAnswers()
    store = SuspendingWrites()
    store.fails = commit_fails
    middleware = middleware_with(inner, store=store)
    registry = middleware.registry
    kinds = event_kinds(registry)
    tasks = []
    exchanges = []
    for request_id in (1, 2):
        task, ex = start_session_less(middleware, request_id, 200)
        tasks.append(task)
        exchanges.append(ex)
        await asyncio.wait_for(inner.entry(request_id).wait(), WAIT)
    store.holding = True
    inner.gate(1).set()
    inner.gate(2).set()
    await asyncio.wait_for(store.began.wait(), WAIT)  # the first commit's write is under way
    for _ in range(5):  # and the second request's answer has had every chance to commit too
        await asyncio.sleep(0)
    store.let_through.set()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    if commit_fails:
        assert [ex.status for ex in exchanges] == [503, 503]
        assert registry.stats.created == 0 and SessionEventKind.CREATED not in kinds
        assert len(store) == 0
    else:
        assert [ex.status for ex in exchanges] == [200, 200]
        assert registry.stats.created == 1 and kinds.count(SessionEventKind.CREATED) == 1
    assert registry.in_flight == 0
    await middleware.shutdown()


async def test_a_session_less_notification_makes_no_session() -> None:
    """Only a request the app serves creates a principal's implicit session: a notification
    (answered 202) leaves nothing behind."""

    async def accepts(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = middleware_with(accepts)
    message = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {}}
    scope, ex = exchange(message)
    scope["headers"].append((b"mcp-protocol-version", b"2026-07-28"))
    await asyncio.wait_for(middleware(scope, ex.receive, ex.send), WAIT)
    assert ex.status == 202
    assert len(middleware.registry) == 0 and len(middleware.registry.store) == 0  # type: ignore[arg-type]
    assert middleware.registry.stats.created == 0
    await middleware.shutdown()


async def test_an_implicit_session_revoked_while_its_first_request_runs_is_not_created() -> None:
    inner = HeldAnswers()
    middleware = middleware_with(inner)
    registry = middleware.registry
    kinds = event_kinds(registry)
    task, ex = start_session_less(middleware, 1, 200)
    await asyncio.wait_for(inner.entry(1).wait(), WAIT)
    assert await registry.revoke_principal("alice") == 1
    inner.gate(1).set()
    await asyncio.wait_for(task, WAIT)
    assert ex.status == 503
    assert ex.json()["error"]["message"].startswith("Session ended before it was ready")
    assert registry.stats.created == 0 and SessionEventKind.CREATED not in kinds
    assert len(registry.store) == 0  # type: ignore[arg-type]
    await middleware.shutdown()


async def test_client_closing_its_connection_mid_tool_call_over_uvicorn(tmp_path: Path) -> None:
    """Real uvicorn: an httpx client that times out, and a raw socket closed after sending."""
    entered: list[int] = []
    release = asyncio.Event()
    server = MCPServer("faults")

    @server.tool()
    async def hold() -> str:
        """Wait until the test releases it."""
        entered.append(1)
        await release.wait()
        return "released"

    clock = ManualClock()
    options: dict[str, Any] = {
        "server": server,
        "clock": clock,
        "policy": SessionPolicy(timeout=TIMEOUT),
    }
    async with anp_stack(tmp_path, **options) as stack, httpx.AsyncClient(timeout=WAIT) as http:
        registry = stack.middleware.registry
        created = await http.post(stack.mcp_url, json=INIT, headers={**ACCEPT, "X-API-Key": ALICE})
        session_id = created.headers["mcp-session-id"]
        headers = {
            **ACCEPT,
            "X-API-Key": ALICE,
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": PROTOCOL,
        }
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "hold", "arguments": {}},
        }
        with pytest.raises(httpx.ReadTimeout):  # gives up and closes its connection
            await http.post(
                stack.mcp_url, json=call, headers=headers, timeout=httpx.Timeout(WAIT, read=0.5)
            )

        # A retry may not reuse the id of a request still in flight in its session (its answer
        # would have two streams to go to); a new id is a new request.
        retried = await http.post(stack.mcp_url, json=call, headers=headers)
        assert retried.status_code == 409
        assert retried.json()["error"]["code"] == -32600
        body = json.dumps({**call, "id": 3}).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        _, writer = await asyncio.open_connection("127.0.0.1", httpx.URL(stack.base_url).port)
        writer.write(
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        await writer.drain()
        await eventually(lambda: len(entered) == 2, "both abandoned calls to reach the tool")
        writer.close()  # the raw client disconnects mid-request
        await writer.wait_closed()

        release.set()  # the abandoned tool calls end; nobody is left to read their answers
        await eventually(lambda: registry.in_flight == 0, "the in-flight marks to be released")
        assert not registry._busy

        listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
        assert (await http.post(stack.mcp_url, json=listing, headers=headers)).status_code == 200
        assert registry.in_flight == 0
        clock.advance(TIMEOUT + 1)
        assert await registry.sweep() == 1
        gone = await http.post(stack.mcp_url, json=listing, headers=headers)
        assert gone.status_code == 404


class RedisThatDies(RedisSessionStore):
    """A real Redis store that stops its redis-server right after a chosen call succeeded."""

    server: RedisServer
    die_after: str | None = None

    def _maybe_die(self, call: str) -> None:
        if self.die_after == call:
            self.die_after = None
            self.server.stop()

    async def read(self, session_id: str) -> Any:
        found = await super().read(session_id)
        self._maybe_die("read")
        return found

    async def create(
        self,
        record: SessionRecord,
        *,
        ttl: float,
        now: float,
        caps: Caps,
        pending: bool = False,
    ) -> CreateOutcome:
        outcome = await super().create(record, ttl=ttl, now=now, caps=caps, pending=pending)
        self._maybe_die("create")
        return outcome


@pytest.mark.parametrize("dies_after", ["read", "create"])
async def test_redis_dying_between_lookup_and_use_releases_the_in_flight_mark(
    tmp_path: Path, dies_after: str
) -> None:
    """The store fails after the session was found (or reserved) but before the app runs."""
    server = RedisServer(tmp_path / "redis", persist=True)
    server.start()
    # recheck=0: every lookup reads the store, so it can die right after one
    store = RedisThatDies.from_url(server.url, timeout=1.0, touch_interval=0, recheck=0)
    store.server = server
    middleware = middleware_with(GatedApp(), store=store, shutdown_grace=1.0)
    registry = middleware.registry
    try:
        session_id = await open_session(middleware)
        store.die_after = dies_after
        if dies_after == "read":
            refused = await drive(middleware, rpc("ping", 2), session_id=session_id)
        else:
            refused = await drive(middleware, INIT)
        assert refused.status == 503, refused.response
        error = refused.json()["error"]
        assert error["message"] == "Session store unavailable; retry shortly"
        assert registry.in_flight == 0, "a refused request left its in-flight mark behind"
        assert not registry._busy

        server.start()  # same port, AOF: the session is back
        assert (await drive(middleware, rpc("ping", 3), session_id=session_id)).status == 200
        assert registry.in_flight == 0
    finally:
        await middleware.shutdown()
        server.stop()


# -- b. sweeps racing requests ------------------------------------------------------------------

RACE_ROUNDS = 25
RACE_MAX_IN_FLIGHT = 4


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_sweeps_racing_requests_never_remove_a_session_in_use(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Random interleavings of blocked requests, clock jumps past the timeout and sweeps.

    No request may find its session closed or gone, at its start or its end; the session exists
    until it has been idle for the timeout after its last request, then it is gone.
    """
    clock = ManualClock()
    inner = GatedApp()
    store: RedisSessionStore | None = None
    past_timeout = TIMEOUT + 1
    if kind == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisSessionStore.from_url(redis_server.url, prefix=f"race-{uuid.uuid4().hex}:")
        past_timeout += store.default_touch_interval  # the shared-store tolerance
    middleware = middleware_with(inner, clock=clock, store=store)
    registry = middleware.registry

    async def exists(session_id: str) -> bool:
        if store is not None:
            return await store.read(session_id) is not None
        return session_id in registry

    async def session_present(state: SessionState) -> bool:
        return await exists(state.session_id)

    inner.check = session_present
    rng = random.Random(f"race-{kind}")
    ids = itertools.count(100)
    sessions: list[str] = []
    blocked = 0
    running: dict[int, tuple[asyncio.Task[None], Exchange]] = {}

    async def launch(session_id: str, *, with_sweep: bool) -> None:
        nonlocal blocked
        request_id = next(ids)
        task, ex = start(middleware, rpc("block", request_id), session_id=session_id)
        running[request_id] = (task, ex)
        blocked += 1
        entered = until_entered(inner, request_id, task, ex)
        if with_sweep:
            await asyncio.gather(registry.sweep(), entered)
        else:
            await entered

    async def finish(request_id: int, *, with_sweep: bool) -> None:
        task, ex = running.pop(request_id)
        inner.gate(request_id).set()
        if with_sweep:
            await asyncio.wait_for(asyncio.gather(task, registry.sweep()), WAIT)
        else:
            await asyncio.wait_for(task, WAIT)
        assert ex.status == 200, ex.response

    try:
        for _ in range(RACE_ROUNDS):
            session_id = await open_session(middleware)
            bystander = await open_session(middleware, key="bob")  # idle all round
            sessions.append(session_id)
            advanced = False

            await launch(session_id, with_sweep=False)
            while running:
                op = rng.choice(["advance", "sweep", "start", "finish", "finish"])
                if op == "advance":
                    clock.advance(past_timeout)
                    advanced = True
                elif op == "sweep":
                    await registry.sweep()
                elif op == "start" and len(running) < RACE_MAX_IN_FLIGHT:
                    await launch(session_id, with_sweep=rng.random() < 0.5)
                elif op == "finish":
                    await finish(rng.choice(list(running)), with_sweep=rng.random() < 0.5)
                assert await exists(session_id)
                assert registry.in_flight == len(running)

            # Idle from now on: a sweep at this instant keeps it, and it still answers.
            await registry.sweep()
            assert await exists(session_id)
            assert (await drive(middleware, rpc("ping", 1), session_id=session_id)).status == 200
            if advanced:  # the idle bystander did expire meanwhile
                gone = await drive(middleware, rpc("ping", 2), key="bob", session_id=bystander)
                assert gone.status == 404

        assert blocked >= RACE_ROUNDS
        assert len([entry for entry in inner.observed if entry[0] >= 100]) == 2 * blocked
        assert [entry for entry in inner.observed if not entry[2]] == []
        assert registry.in_flight == 0

        # Once idle past the timeout, every one of them is gone.
        clock.advance(past_timeout)
        await registry.sweep()
        for session_id in sessions:
            gone = await drive(middleware, rpc("ping", 3), session_id=session_id)
            assert gone.status == 404
            assert not await exists(session_id)
    finally:
        await middleware.shutdown()


# -- c. Redis restarted under load --------------------------------------------------------------


class Traffic:
    """Handshake-era sessions driven by plain JSON-RPC POSTs, each answer recorded."""

    def __init__(self, http: httpx.AsyncClient, key: str | None = None) -> None:
        self.http = http
        self.key = key
        self.answers: list[tuple[str, int, Any]] = []  # (phase, status, JSON body or None)
        self.phase = "up"

    def headers(self, session_id: str | None = None) -> dict[str, str]:
        headers = dict(ACCEPT)
        if self.key is not None:
            headers["X-API-Key"] = self.key
        if session_id is not None:
            headers["Mcp-Session-Id"] = session_id
            headers["MCP-Protocol-Version"] = PROTOCOL
        return headers

    async def open(self, mcp_url: str) -> str:
        created = await self.http.post(mcp_url, json=INIT, headers=self.headers())
        assert created.status_code == 200, created.text
        session_id = created.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        done = await self.http.post(mcp_url, json=note, headers=self.headers(session_id))
        assert done.status_code == 202, done.text
        return session_id

    async def call(self, mcp_url: str, session_id: str, payload: dict[str, Any]) -> int:
        response = await self.http.post(mcp_url, json=payload, headers=self.headers(session_id))
        body = answer_of(response)
        self.answers.append((self.phase, response.status_code, body))
        return response.status_code


def whoami_call(request_id: int, rpc_url: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {
            "name": "anp_invokeOpenRPC",
            "arguments": {"endpoint": rpc_url, "method": "whoami"},
        },
    }


RESTART_SESSIONS = 24


async def test_redis_restarted_under_load_is_503_then_every_session_resumes(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis", persist=True)
    redis.start()
    store = RedisSessionStore.from_url(redis.url, timeout=1.0)
    try:
        async with (
            anp_stack(tmp_path, store=store) as stack,
            httpx.AsyncClient(timeout=WAIT) as http,
        ):
            registry = stack.middleware.registry
            rpc_url = f"{stack.base_url}/agent/rpc"
            dids = {ALICE: stack.identities["alice"].did, BOB: stack.identities["bob"].did}
            traffic = {key: Traffic(http, key) for key in (ALICE, BOB)}
            sessions = [
                (key, await traffic[key].open(stack.mcp_url))
                for key in [ALICE, BOB] * (RESTART_SESSIONS // 2)
            ]
            ok_after_restart: Counter[str] = Counter()
            ok_total: Counter[str] = Counter()
            stop = asyncio.Event()

            async def worker(key: str, session_id: str) -> None:
                for n in itertools.count(2):
                    if stop.is_set():
                        return
                    payload = whoami_call(n, rpc_url) if n % 3 == 0 else rpc("ping", n)
                    status = await traffic[key].call(stack.mcp_url, session_id, payload)
                    if status == 200:
                        ok_total[session_id] += 1
                        if traffic[key].phase == "restarted":
                            ok_after_restart[session_id] += 1
                    await asyncio.sleep(0)

            def outage_answers() -> int:
                return sum(status == 503 for t in traffic.values() for _, status, _ in t.answers)

            workers = [asyncio.create_task(worker(key, sid)) for key, sid in sessions]
            try:
                await eventually(
                    lambda: all(ok_total[sid] >= 2 for _, sid in sessions), "load to run"
                )
                for t in traffic.values():
                    t.phase = "down"
                await asyncio.to_thread(redis.stop)
                await eventually(lambda: outage_answers() >= RESTART_SESSIONS, "503s in outage")
                await asyncio.to_thread(redis.start)  # same port; the AOF brings sessions back
                for t in traffic.values():
                    t.phase = "restarted"
                await eventually(
                    lambda: all(ok_after_restart[sid] >= 2 for _, sid in sessions),
                    "every session to work again under load",
                )
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers), WAIT)

            answers = [a for t in traffic.values() for a in t.answers]
            assert {status for _, status, _ in answers} == {200, 503}
            for phase, status, body in answers:
                if status == 503:
                    assert phase != "up"
                    assert body["jsonrpc"] == "2.0" and isinstance(body["id"], int)
                    assert body["error"]["code"] == -32603
                    assert body["error"]["message"] == "Session store unavailable; retry shortly"
                else:
                    assert "error" not in body, body
                    assert not body["result"].get("isError"), body
            for key, t in traffic.items():
                for _, status, body in t.answers:
                    structured = body.get("result", {}).get("structuredContent") if body else None
                    if status == 200 and structured is not None:
                        assert structured["result"]["did"] == dids[key]

            # Every session opened before the restart still works, one by one.
            for key, session_id in sessions:
                assert await traffic[key].call(stack.mcp_url, session_id, rpc("ping", 1)) == 200
            assert registry.in_flight == 0
            assert set(registry.stats.rejected) == {"store_unavailable"}
    finally:
        redis.stop()


# -- d. a worker killed mid-load ----------------------------------------------------------------

KILL_SESSIONS = 24


async def test_a_killed_worker_loses_no_session(tmp_path: Path) -> None:
    """Two real processes share Redis; one is SIGKILLed under load; the other serves all."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    data_dir = tmp_path / "data"
    ensure_dev_identity(data_dir)  # both processes sign as the same dev identity
    flags = ("--store-url", redis.url, "--log-level", "WARNING")
    try:
        with (
            launcher(tmp_path, *flags, name="a", data_dir=data_dir) as a,
            launcher(tmp_path, *flags, name="b", data_dir=data_dir) as b,
        ):
            urls = {"a": f"{a.base_url}/mcp", "b": f"{b.base_url}/mcp"}
            # (idle connections let go before the server closes them: see test_load)
            limits = httpx.Limits(max_connections=16, keepalive_expiry=2.0)
            async with httpx.AsyncClient(timeout=WAIT, limits=limits) as http:
                traffic = Traffic(http)
                sessions = [
                    await traffic.open(urls["a" if i % 2 == 0 else "b"])
                    for i in range(KILL_SESSIONS)
                ]
                ok: Counter[tuple[str, str]] = Counter()  # (worker, session) -> 200s
                lost_on_a = 0
                killed = asyncio.Event()
                stop = asyncio.Event()
                listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}

                async def worker(session_id: str) -> None:
                    nonlocal lost_on_a
                    for n in itertools.count():
                        if stop.is_set():
                            return
                        target = "a" if n % 2 else "b"
                        payload = listing if n % 4 < 2 else rpc("ping", n)
                        try:
                            status = await traffic.call(urls[target], session_id, payload)
                        except httpx.TransportError:
                            # Only the killed worker may fail, and only once it is being killed.
                            assert target == "a" and killed.is_set()
                            lost_on_a += 1
                            continue
                        assert status == 200, (target, traffic.answers[-1])
                        ok[target, session_id] += 1

                workers = [asyncio.create_task(worker(sid)) for sid in sessions]
                try:
                    await eventually(
                        lambda: all(ok["a", s] >= 2 and ok["b", s] >= 2 for s in sessions),
                        "load on both workers",
                    )
                    killed.set()
                    a.process.kill()  # SIGKILL: no shutdown, no goodbye
                    await asyncio.to_thread(a.process.wait, WAIT)
                    before = {s: ok["b", s] for s in sessions}
                    await eventually(
                        lambda: all(ok["b", s] >= before[s] + 3 for s in sessions),
                        "the survivor to keep serving",
                    )
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*workers), WAIT)
                assert lost_on_a > 0  # it really died under load

                # Every session, wherever it was created, answers on the survivor.
                rpc_url = f"{b.base_url}/agent/rpc"
                dev_did = json.loads((data_dir / "dev" / "did.json").read_text())["id"]
                for n, session_id in enumerate(sessions):
                    assert await traffic.call(urls["b"], session_id, listing) == 200
                    status = await traffic.call(urls["b"], session_id, whoami_call(n, rpc_url))
                    assert status == 200
                    result = traffic.answers[-1][2]["result"]
                    assert result["structuredContent"]["result"]["did"] == dev_did
    finally:
        redis.stop()


@pytest.mark.parametrize("stall", ["create", "write"])
async def test_a_request_during_the_removal_of_a_cancelled_creation_is_not_served_on_it(
    stall: str,
) -> None:
    """The creating request is cancelled inside a store call; the principal's next request
    comes while the record's removal is under way (the store still holds it): it is refused as
    the session being replaced (503, retry), never served on a session about to be deleted.
    Once the removal is through, the next request makes a new session."""
    store = StallsOnce(stall)
    inner = HeldAnswers()
    middleware = middleware_with(inner, store=store)
    registry = middleware.registry
    remove = store.remove
    removing, finish = asyncio.Event(), asyncio.Event()

    async def held_remove(session_id: str, *, created_at: float | None = None) -> bool:
        removing.set()
        await finish.wait()
        return await remove(session_id, created_at=created_at)

    store.remove = held_remove  # type: ignore[method-assign]
    cancelled, cancelled_ex = start_session_less(middleware, 1, 200)
    await asyncio.wait_for(store.stalled.wait(), WAIT)
    cancelled.cancel()
    await asyncio.wait_for(cancelled, WAIT)
    assert cancelled_ex.status == 503
    await asyncio.wait_for(removing.wait(), WAIT)
    inner.gate(2).set()
    during, during_ex = start_session_less(middleware, 2, 200)
    await asyncio.wait_for(during, WAIT)
    assert during_ex.status == 503 and not inner.entry(2).is_set()
    finish.set()
    assert await registry.settle(WAIT)
    assert len(store) == 0 and registry.stats.created == 0
    inner.gate(3).set()
    after, after_ex = start_session_less(middleware, 3, 200)
    await asyncio.wait_for(after, WAIT)
    assert after_ex.status == 200 and len(store) == 1 and registry.stats.created == 1
    await middleware.shutdown()
