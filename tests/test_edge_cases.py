"""Edge cases found in review: lazy start under concurrency, store failures at the end of a
refused handshake, max age under a long request, slow agents, and state-file restore order."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mcp2anp_middleware import (
    ANPToolkit,
    MCPSessionMiddleware,
    SessionState,
    URLPolicy,
    ensure_dev_identity,
)
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.private_files import write_private_file
from mcp2anp_middleware.sessions import state_file as state_file_module
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.stores import InMemorySessionStore, StoreUnavailable

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE, INITIALIZE, MCP_HEADERS, PING
from .servers import free_port, serve

pytestmark = pytest.mark.anyio


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_concurrent_first_requests_without_lifespan_all_succeed() -> None:
    endpoint = MCPEndpoint(MCPServer("lazy"))
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=endpoint, services=[endpoint.service])
    async with client_for(middleware) as client:
        responses = await asyncio.gather(
            *[client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS) for _ in range(5)]
        )
    assert [r.status_code for r in responses] == [200] * 5
    await middleware.shutdown()


class FlakyDeleteStore(InMemorySessionStore):
    """An in-memory store whose deletes fail, like a Redis that just went away."""

    async def delete(self, session_id: str, *, created_at: float | None = None) -> bool:
        raise StoreUnavailable("down")


async def test_refused_handshake_releases_in_flight_even_if_the_store_fails() -> None:
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=RecordingMCPApp(), store=FlakyDeleteStore(), clock=ManualClock()
    )
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json={**BARE_INITIALIZE, "params": {"reject": True}})
    assert response.status_code == 400
    assert middleware.registry.in_flight == 0
    assert await middleware.registry.wait_idle(0)


async def test_max_session_age_applies_while_a_long_request_runs() -> None:
    clock = ManualClock()
    inner = RecordingMCPApp()
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=inner, clock=clock, policy=SessionPolicy(max_age=10)
    )
    async with client_for(middleware) as client:
        session_id = (await client.post("/mcp", json=BARE_INITIALIZE)).headers["mcp-session-id"]
        headers = {"Mcp-Session-Id": session_id}
        long = asyncio.create_task(
            client.post(
                "/mcp", json={"jsonrpc": "2.0", "id": 9, "method": "block"}, headers=headers
            )
        )
        await inner.started.wait()
        clock.advance(11)
        refused = await client.post("/mcp", json=PING, headers=headers)
        assert refused.status_code == 404
        inner.release.set()
        assert (await long).status_code == 200  # the running request was not cut off
    assert session_id not in middleware.registry  # removed when it ended


async def test_an_agent_dripping_bytes_hits_the_overall_timeout(tmp_path: Path) -> None:
    async def drip(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(200):
                yield b" "
                await asyncio.sleep(0.05)

        return StreamingResponse(chunks(), media_type="application/json")

    toolkit = ANPToolkit(url_policy=URLPolicy(allow_private=True, timeout=0.5))
    state = SessionState("d" * 43, ensure_dev_identity(tmp_path), created_at=0.0)
    async with serve(Starlette(routes=[Route("/slow", drip)]), port=free_port()) as base_url:
        with pytest.raises(ANPToolError) as caught:
            await toolkit.handler_for(state).fetch_doc(f"{base_url}/slow")
    await toolkit.http.aclose()
    assert caught.value.code == "TIMEOUT"


def restoring(state_file: Path, sessions: list[Any], clock: ManualClock) -> MCPSessionMiddleware:
    """A middleware (timeout 60 s) whose start will restore ``sessions`` from ``state_file``."""
    state_file.write_text(json.dumps({"version": 1, "sessions": sessions}))
    middleware = MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        clock=clock,
        policy=SessionPolicy(timeout=60),
        state_file=state_file,
    )
    return middleware


async def test_restored_sessions_are_swept_in_order_of_use(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    clock = ManualClock()
    now = clock()
    sessions = [  # created in this order; the first was used most recently
        {"id": "a" * 43, "principal": "p", "created_at": now - 100, "last_accessed": now - 1},
        {"id": "b" * 43, "principal": "p", "created_at": now - 90, "last_accessed": now - 50},
    ]
    middleware = restoring(state_file, sessions, clock)
    await middleware.startup()
    clock.advance(20)  # b idle 70 s: expired; a idle 21 s
    assert await middleware.registry.sweep() == 1
    assert "a" * 43 in middleware.registry and "b" * 43 not in middleware.registry
    await middleware.shutdown()


@pytest.mark.parametrize(
    "document",
    [
        {"version": 1, "sessions": None},
        {"version": 1, "sessions": 5},
        {"version": 1, "sessions": "x"},
        [1, 2],
        "[" * 100_000,
    ],
)
async def test_a_state_file_of_another_shape_restores_nothing_and_never_stops_the_start(
    tmp_path: Path, document: object
) -> None:
    state_file = tmp_path / "state.json"
    text = document if isinstance(document, str) else json.dumps(document)
    state_file.write_text(text)
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    await middleware.startup()
    assert len(middleware.registry) == 0 and middleware.background.ready
    await middleware.shutdown()


async def test_a_state_files_malformed_entries_are_skipped_and_clocks_ahead_taken_as_now(
    tmp_path: Path,
) -> None:
    """Entries that would restore something wrong are left out: an id no client could send or
    of the wrong kind, no principal, times that overflow; times ahead of now (a file from a
    machine whose clock was ahead, or edited) are taken as now, so such a session still goes
    idle and ages."""
    state_file = tmp_path / "state.json"
    clock = ManualClock()
    now = clock()
    good = {"principal": "p", "created_at": now - 10, "last_accessed": now - 5}
    sessions = [
        {"id": "a" * 43, **good},
        {"id": "f" * 43, **good, "created_at": now + 1e9, "last_accessed": 1e300},
        {"id": "b" * 43, **good, "created_at": int("9" * 400)},
        {"id": "c" * 43, **good, "principal": None},
        {"id": "bad id", **good},
        {"id": "implicit-" + "0" * 40, **good},  # another principal's implicit id
        {"id": "d" * 43, **good, "implicit": True},  # an implicit session needs its own id
        {"id": "e" * 43, **good, "last_accessed": float("nan")},
        "not an entry",
    ]
    middleware = restoring(state_file, sessions, clock)
    await middleware.startup()
    registry = middleware.registry
    assert sorted(record.session_id for record in registry.store.records()) == ["a" * 43, "f" * 43]  # type: ignore[attr-defined]
    clock.advance(61)  # both idle past the timeout: the one from the future too
    await registry.sweep()
    assert len(registry) == 0
    await middleware.shutdown()


def test_a_private_file_is_written_whole_with_its_mode_never_through_a_link(
    tmp_path: Path,
) -> None:
    """A link at the target is replaced (its target untouched); the file has its mode whatever
    the one it replaces had; writers at once each write whole files; nothing is left beside."""
    target = tmp_path / "state.json"
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    target.symlink_to(elsewhere)
    write_private_file(target, b"secret ids")
    assert target.read_bytes() == b"secret ids" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert elsewhere.read_text() == "keep me"
    target.chmod(0o644)
    write_private_file(target, b"newer ids")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == b"newer ids"
    public = tmp_path / "did.json"
    write_private_file(public, b"{}", mode=0o644)
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda data: write_private_file(target, data), payloads))
    assert target.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["did.json", "elsewhere.txt", "state.json"]


async def test_a_restored_session_keeps_its_mcp_handshake(tmp_path: Path) -> None:
    """Without it the SDK's kernel would treat the restored session as uninitialized and refuse
    every request on it, while the client still holds a valid id."""
    state_file = tmp_path / "state.json"
    tools_list = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}

    def hosted() -> MCPSessionMiddleware:
        endpoint = MCPEndpoint(MCPServer("restored"), json_response=True)
        return MCPSessionMiddleware(
            HostApp(), mcp_app=endpoint, services=[endpoint.service], state_file=state_file
        )

    first = hosted()
    async with client_for(first) as client:
        created = await client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        headers = {**MCP_HEADERS, "Mcp-Session-Id": created.headers["mcp-session-id"]}
        headers["MCP-Protocol-Version"] = "2025-11-25"
        before = await client.post("/mcp", json=tools_list, headers=headers)
    assert before.status_code == 200 and "result" in before.json()
    await first.shutdown()
    assert json.loads(state_file.read_text())["sessions"][0]["handshake"]

    second = hosted()
    async with client_for(second) as client:
        after = await client.post("/mcp", json=tools_list, headers=headers)
    assert after.status_code == 200
    assert after.json() == before.json()
    await second.shutdown()


async def test_concurrent_first_requests_wait_for_the_saved_sessions(tmp_path: Path) -> None:
    """A host without lifespan events: each first request starts the middleware, and none is
    served before the state file's sessions are back."""
    state_file = tmp_path / "state.json"
    first = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(first) as client:
        session_id = (await client.post("/mcp", json=BARE_INITIALIZE)).headers["mcp-session-id"]
    await first.shutdown()
    second = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(second) as client:
        headers = {"Mcp-Session-Id": session_id}
        answers = await asyncio.gather(
            *(client.post("/mcp", json=PING, headers=headers) for _ in range(3))
        )
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    await second.shutdown()


async def test_every_start_consumes_the_state_file(tmp_path: Path) -> None:
    """Started again in the same process (a second lifespan cycle), the middleware still reads
    and deletes the file its last stop wrote: left in place, it would bring back after a crash
    a session deleted meanwhile."""
    state_file = tmp_path / "state.json"
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    await middleware.startup()
    async with client_for(middleware) as client:
        session_id = (await client.post("/mcp", json=BARE_INITIALIZE)).headers["mcp-session-id"]
    await middleware.shutdown()
    assert state_file.exists()
    await middleware.startup()
    assert not state_file.exists()
    async with client_for(middleware) as client:
        headers = {"Mcp-Session-Id": session_id}
        assert (await client.post("/mcp", json=PING, headers=headers)).status_code == 200
        assert (await client.delete("/mcp", headers=headers)).status_code == 204
    await middleware.shutdown()
    restarted = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(restarted) as client:
        headers = {"Mcp-Session-Id": session_id}
        assert (await client.post("/mcp", json=PING, headers=headers)).status_code == 404
    await restarted.shutdown()


async def test_a_post_to_a_session_ended_after_its_lookup_is_not_found() -> None:
    """A session removed between the middleware's lookup and the endpoint (a DELETE, an eviction
    or a revocation on another worker, with Redis) is answered as the spec says, 404, which
    tells the client to initialize again; a GET already was."""
    endpoint = MCPEndpoint(MCPServer("ended"), json_response=True)
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=endpoint, services=[endpoint.service])
    registry = middleware.registry
    async with client_for(middleware) as client:
        created = await client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        headers = {**MCP_HEADERS, "Mcp-Session-Id": created.headers["mcp-session-id"]}
        acquire = registry.acquire

        async def removed_meanwhile(state: Any) -> None:
            await registry.remove(state.session_id, reason="deleted")
            await acquire(state)

        registry.acquire = removed_meanwhile  # type: ignore[method-assign]
        ended = await client.post("/mcp", json=PING, headers=headers)
    assert ended.status_code == 404
    assert ended.json()["error"]["message"] == "Session not found"
    assert ended.json()["id"] == PING["id"]
    assert registry.in_flight == 0
    await middleware.shutdown()


async def test_a_content_length_of_thousands_of_digits_is_too_large() -> None:
    """Past 4,300 digits ``int()`` raises: the request must still get its 413 (a JSON-RPC body),
    not a 500 with none."""
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp())
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    for length in (b"9" * 30, b"9" * 5000):
        sent.clear()
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/mcp",
            "headers": [(b"content-type", b"application/json"), (b"content-length", length)],
        }
        await middleware(scope, receive, send)
        assert sent[0]["status"] == 413
        assert json.loads(sent[1]["body"])["error"]["message"].startswith("Request body exceeds")
    await middleware.shutdown()


def test_session_caps_are_whole_numbers_of_at_least_one() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="at least 1"):
            SessionPolicy(per_principal_cap=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least 1"):
            SessionPolicy(global_cap=bad)  # type: ignore[arg-type]
    assert SessionPolicy(per_principal_cap=1, global_cap=None).per_principal_cap == 1


async def test_a_middleware_started_again_restores_the_state_file(tmp_path: Path) -> None:
    """A stop leaves the registry refusing new sessions; a later start takes new ones again
    before it restores the file's (they were all refused, and the file deleted anyway)."""
    state_file = tmp_path / "state.json"
    first = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(first) as client:
        session_id = (await client.post("/mcp", json=BARE_INITIALIZE)).headers["mcp-session-id"]
    await first.shutdown()
    second = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp())
    await second.startup()
    await second.shutdown()  # one start and stop before, without the file
    second.state_file = state_file
    await second.startup()
    async with client_for(second) as client:
        ping = await client.post("/mcp", json=PING, headers={"Mcp-Session-Id": session_id})
    assert ping.status_code == 200
    await second.shutdown()


async def test_a_request_waiting_for_a_start_is_refused_once_stopped(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(middleware) as client:
        await client.post("/mcp", json=BARE_INITIALIZE)
        await middleware.shutdown()
        assert state_file.exists()
        assert not await middleware._start_for_request()  # (as a request queued meanwhile)
        late = await client.post("/mcp", json=BARE_INITIALIZE)
    assert late.status_code == 503
    assert state_file.exists() and not middleware.background.ready  # nothing started again


async def test_a_middleware_stopped_without_a_start_leaves_the_state_file(tmp_path: Path) -> None:
    """Never started (no lifespan events, no request), it never read the file: stopping it
    must not replace the file's sessions with none."""
    state_file = tmp_path / "state.json"
    first = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    async with client_for(first) as client:
        await client.post("/mcp", json=BARE_INITIALIZE)
    await first.shutdown()
    saved = state_file.read_text()
    idle = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), state_file=state_file)
    await idle.shutdown()
    assert state_file.read_text() == saved


def test_one_middleware_starts_lazily_on_one_event_loop_after_another() -> None:
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp())

    async def first_requests() -> list[int]:
        async with client_for(middleware) as client:
            answers = await asyncio.gather(
                *(client.post("/mcp", json=BARE_INITIALIZE) for _ in range(2))
            )
        return [answer.status_code for answer in answers]

    assert asyncio.run(first_requests()) == [200, 200]
    assert asyncio.run(first_requests()) == [200, 200]


async def test_long_accept_and_content_type_values_are_checked_but_never_cached() -> None:
    """A client sends the same short headers every time (cached); one sending long values
    cannot fill the caches with them, and gets the same answers."""
    from mcp2anp_middleware.mcp_hosting import endpoint as endpoint_module

    accepted = endpoint_module._accepted_cached
    json_type = endpoint_module._is_json_cached
    endpoint = MCPEndpoint(MCPServer("headers"))
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=endpoint, services=[endpoint.service])
    padding = ", ".join(f"x/y{i}" for i in range(60))  # well over 256 characters
    async with client_for(middleware) as client:
        accepted.cache_clear()
        json_type.cache_clear()
        long = httpx.Headers(MCP_HEADERS)
        long["accept"] = f"application/json, text/event-stream, {padding}"
        long["content-type"] = f"application/json; {padding.replace(', ', '; p=')}"
        answer = await client.post("/mcp", json=INITIALIZE, headers=long)
        assert answer.status_code == 200
        assert accepted.cache_info().currsize == json_type.cache_info().currsize == 0
        long["accept"] = f"text/html, {padding}"
        refused = await client.post("/mcp", json=INITIALIZE, headers=long)
        assert refused.status_code == 406
        assert accepted.cache_info().currsize == 0
        answer = await client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
        assert answer.status_code == 200
        assert accepted.cache_info().currsize == json_type.cache_info().currsize == 1
    await middleware.shutdown()


def test_side_apps_that_could_never_be_reached_or_would_be_open_are_refused() -> None:
    """An empty statistics token (an unset variable) would let everyone in; a side app under the
    MCP prefix would never be reached (the prefix's requests are MCP requests)."""
    with pytest.raises(ValueError, match="token is empty"):
        MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), stats_path="/s", stats_token="")
    for options in (
        {"stats_path": "/mcp/stats"},
        {"admin_token": "t" * 20, "admin_path": "/mcp/admin"},
    ):
        with pytest.raises(ValueError, match="under the MCP prefix"):
            MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), **options)  # type: ignore[arg-type]


async def test_a_state_file_that_cannot_be_deleted_or_written_never_stops_start_or_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only directory (simulated: these tests may run as root, whom permissions do not
    stop): the restore still counts and the start goes on; a save that fails leaves the rest of
    the stop to run."""
    state_file = tmp_path / "state.json"
    clock = ManualClock()
    now = clock()
    entry = {"id": "a" * 43, "principal": "p", "created_at": now - 1, "last_accessed": now - 1}

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "unlink", refused)
    monkeypatch.setattr(state_file_module, "write_private_file", refused)
    middleware = restoring(state_file, [entry], clock)
    await middleware.startup()
    assert "a" * 43 in middleware.registry and middleware.background.ready
    await middleware.shutdown()
    assert not middleware.background.running


def test_the_statistics_and_the_admin_api_cannot_share_a_path() -> None:
    with pytest.raises(ValueError, match="both the statistics and the admin path"):
        MCPSessionMiddleware(
            HostApp(),
            mcp_app=RecordingMCPApp(),
            stats_path="/mcp-admin/sessions",
            admin_token="t" * 20,
        )


async def test_a_handler_failure_is_logged_as_text_without_exc_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request handler that raises (here a host's server middleware): answered as an error,
    and logged with its traceback as text, not ``exc_info`` (which a structlog renderer with
    ``rich`` would print with the frames' locals)."""

    async def broken(ctx: Any, call_next: Any) -> Any:
        if ctx.method == "ping":
            raise RuntimeError("host middleware bug")
        return await call_next(ctx)

    endpoint = MCPEndpoint(MCPServer("broken", middleware=[broken]), json_response=True)
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=endpoint, services=[endpoint.service])
    ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
    with caplog.at_level(logging.ERROR, logger="mcp2anp_middleware.mcp_hosting"):
        async with client_for(middleware) as client:
            created = await client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
            headers = {**MCP_HEADERS, "Mcp-Session-Id": created.headers["mcp-session-id"]}
            headers["MCP-Protocol-Version"] = "2025-11-25"
            answer = await client.post("/mcp", json=ping, headers=headers)
    assert "error" in answer.json()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Handler for 'ping'")]
    assert record.exc_info is None
    assert "RuntimeError: host middleware bug" in record.getMessage()
    await middleware.shutdown()
