"""Full MCP sessions across workers: two middleware instances (two workers) on one real Redis,
each under real uvicorn, with requests sent to one or the other by hand so every step is
deterministic; and one worker with the memory store for the official client."""

from __future__ import annotations

import gc
import json
import math
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import mcp
import pytest
import redis.asyncio
from mcp import types
from mcp.client.session import ClientRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.message import ServerMessageMetadata
from mcp_types import PROTOCOL_VERSION_META_KEY, JSONRPCNotification, JSONRPCRequest
from starlette.applications import Starlette
from starlette.types import Message

from mcp2anp_middleware import ANPMiddleware, SessionConfig
from mcp2anp_middleware.mcp_hosting import endpoint as endpoint_module
from mcp2anp_middleware.mcp_hosting.backplane import (
    LISTENER_BUFFER,
    OWNER_STREAM,
    Event,
    LocalBackplane,
    LocalRelay,
    MemoryEventLog,
    Note,
    priming_id,
)
from mcp2anp_middleware.mcp_hosting.live_session import STANDALONE, LiveSession
from mcp2anp_middleware.mcp_hosting.redis_backplane import (
    RedisBackplane,
    RedisEventLog,
    RedisRelay,
)
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .fidelity_server import Gate, fidelity_server
from .redis_server import RedisServer
from .servers import serve

pytestmark = pytest.mark.anyio

PROTOCOL = "2025-11-25"
ACCEPT = {"Accept": "application/json, text/event-stream"}


@dataclass
class Worker:
    url: str
    app: ANPMiddleware


@asynccontextmanager
async def workers(
    tmp_path: Path,
    count: int,
    redis: RedisServer | None,
    gate: Gate | None = None,
    *,
    prefix: str = "fidelity:",
    recheck: float = 1.0,
    **session_options: Any,
) -> AsyncIterator[list[Worker]]:
    async with AsyncExitStack() as stack:
        found = []
        for index in range(count):
            options: dict[str, Any] = dict(session_options)
            if redis is not None:
                store = RedisSessionStore.from_url(redis.url, prefix=prefix, recheck=recheck)
                options["store"] = store
            server = fidelity_server(gate)
            data_dir = tmp_path / f"w{index}"
            app = ANPMiddleware(Starlette(), server=server, data_dir=data_dir, **options)
            base = await stack.enter_async_context(serve(app))
            found.append(Worker(base + "/mcp", app))
        yield found


def sse_events(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body: ``id`` and the parsed ``data`` (None for a priming event)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            if name in ("id", "data"):
                fields[name] = value.strip()
        if fields:
            data = fields.get("data") or None
            events.append({"id": fields.get("id"), "data": json.loads(data) if data else None})
    return events


def answer_events(answer: httpx.Response) -> list[dict[str, Any]]:
    """The events of a POST's answer: an SSE stream, or a quick answer as one JSON body (the
    endpoint streams only what needs a stream)."""
    content_type = answer.headers["content-type"]
    if content_type.startswith("application/json"):
        return [{"id": None, "data": answer.json()}]
    assert content_type.startswith("text/event-stream"), content_type
    return sse_events(answer.text)


class RawClient:
    """The protocol by hand: which worker each request goes to is the test's choice."""

    def __init__(self, http: httpx.AsyncClient, protocol: str = PROTOCOL) -> None:
        self.http = http
        self.protocol = protocol
        self.session_id = ""

    def headers(self, **extra: str) -> dict[str, str]:
        return {
            **ACCEPT,
            "Mcp-Session-Id": self.session_id,
            "MCP-Protocol-Version": self.protocol,
            **extra,
        }

    async def initialize(self, url: str) -> None:
        message = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": self.protocol,
                "capabilities": {"sampling": {}, "elicitation": {}},
                "clientInfo": {"name": "raw-client", "version": "1"},
            },
        }
        answer = await self.http.post(url, json=message, headers=ACCEPT)
        assert answer.status_code == 200, answer.text
        self.session_id = answer.headers["mcp-session-id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await self.http.post(url, json=note, headers=self.headers())).status_code == 202

    async def call(self, url: str, request_id: int | str, tool: str) -> list[dict[str, Any]]:
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {}},
        }
        answer = await self.http.post(url, json=message, headers=self.headers())
        assert answer.status_code == 200, answer.text
        return answer_events(answer)


async def id_of_first_message(lines: AsyncIterator[str]) -> str:
    """Read an SSE stream's lines up to its first message (not a priming event): its id."""
    event_id = None
    with anyio.fail_after(10):
        async for line in lines:
            if line.startswith("id:"):
                event_id = line[3:].strip()
            if line.startswith("data:") and line[5:].strip():
                break
    assert event_id is not None
    return event_id


async def first_message(lines: AsyncIterator[str]) -> Any:
    """Read an SSE stream's lines up to its first message (not a priming event): its JSON."""
    with anyio.fail_after(10):
        async for line in lines:
            if line.startswith("data:") and line[5:].strip():
                return json.loads(line[5:])
    raise AssertionError("the stream ended without a message")


async def dropped_slow_call(http: httpx.AsyncClient, client: RawClient, url: str) -> str:
    """Call the gated ``slow`` tool and drop its stream after the priming event: its id."""
    message = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "p"}},
    }
    async with http.stream("POST", url, json=message, headers=client.headers()) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("id:"):
                return line[3:].strip()
    raise AssertionError("no priming event")


async def resuming_a_dropped_call(
    http: httpx.AsyncClient, client: RawClient, url: str, gate: Gate
) -> dict[str, str]:
    """The gated ``slow`` tool called and its stream dropped after the priming event; once the
    call runs, the headers of a GET resuming it."""
    priming = await dropped_slow_call(http, client, url)
    await gate.started.wait()
    return client.headers(**{"Last-Event-ID": priming})


@asynccontextmanager
async def session_on_two_workers(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[Worker, Worker, httpx.AsyncClient, RawClient]]:
    """Two workers on Redis (keys of their own), and a session initialized on the first."""
    prefix = f"two-{uuid.uuid4().hex[:8]}:"
    async with (
        workers(tmp_path, 2, redis_server, prefix=prefix) as (a, b),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        yield a, b, http, client


def result_text(events: list[dict[str, Any]]) -> str:
    final = events[-1]["data"]
    text: str = final["result"]["content"][0]["text"]
    return text


async def test_every_worker_serves_the_session_with_its_handshake(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with workers(tmp_path, 2, redis_server) as (a, b), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        seen = json.loads(result_text(await client.call(b.url, 1, "whoami")))
        assert seen == {
            "client": "raw-client",
            "sampling": True,
            "elicitation": True,
            "protocol": PROTOCOL,
        }
        # the machinery stays warm for the session's next request, then is released
        assert set(b.app.endpoint.live) == {client.session_id}
        assert b.app.endpoint.release_idle(math.inf) == 1 and a.app.endpoint.release_idle(math.inf)
        assert not a.app.endpoint.live and not b.app.endpoint.live


@pytest.mark.parametrize("shared", [False, True])
async def test_a_refused_initialize_evicts_none_of_its_principals_sessions(
    tmp_path: Path, redis_server: RedisServer, shared: bool
) -> None:
    """With ``evict_oldest``, the principal's oldest session makes room for a new one only when
    the new one's ``initialize`` is served: one the SDK refuses (here, without a protocol
    version) costs nothing. Two workers on Redis, or one with the memory store."""
    redis = redis_server if shared else None
    policy = SessionPolicy(per_principal_cap=1, cap_policy="evict_oldest")
    prefix = f"evict-{uuid.uuid4().hex[:8]}:"
    async with (
        # (recheck=0: a worker reads the store at every lookup, not waiting for the notice)
        workers(
            tmp_path, 2 if shared else 1, redis, prefix=prefix, recheck=0, policy=policy
        ) as found,
        httpx.AsyncClient() as http,
    ):
        first, other = found[0], found[-1]
        kept = RawClient(http)
        await kept.initialize(first.url)
        refused = await http.post(
            other.url,
            json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}},
            headers=ACCEPT,
        )
        assert "mcp-session-id" not in refused.headers
        assert refused.json()["error"]["code"] == -32602, refused.text
        assert result_text(await kept.call(other.url, 1, "whoami"))  # still there
        newer = RawClient(http)
        await newer.initialize(other.url)  # served: the older session makes room
        gone = await http.post(
            first.url,
            json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
            headers=kept.headers(),
        )
        assert gone.status_code == 404, gone.text
        assert result_text(await newer.call(first.url, 3, "whoami"))
        assert (
            first.app.registry.stats.removed["evicted"]
            + (other.app.registry.stats.removed["evicted"] if shared else 0)
            == 1
        )


async def test_a_quick_answer_is_plain_json_and_costs_no_event_log_write(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An answer ready before anything of its stream went out is the whole response, as JSON:
    the client never saw an event id to resume with, so the answer is not logged (no Redis
    write). A request that sends something first streams, and its events are logged."""
    async with workers(tmp_path, 1, redis_server) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami"}}
        answer = await http.post(worker.url, json=message, headers=client.headers())
        assert answer.headers["content-type"] == "application/json"
        assert json.loads(answer.json()["result"]["content"][0]["text"])["client"] == "raw-client"
        log_key = f"fidelity:log:{client.session_id}"
        assert await redis_server_keys(redis_server, log_key) == 0
        events = await client.call(worker.url, 2, "chatty")
        assert events[0]["data"] is None and events[0]["id"]  # the priming event
        assert all(event["id"] for event in events)
        assert await redis_server_keys(redis_server, log_key) == 1


async def test_an_answer_overtaking_an_event_on_its_way_still_streams(tmp_path: Path) -> None:
    """A progress event is being logged (a store round trip) when the tool's answer comes: the
    answer must not go out alone as JSON, as if nothing had come before it. Both stream, the
    progress first, each with its id."""
    server = MCPServer("overtaking")
    progress_logging = anyio.Event()
    progress_logged = anyio.Event()
    answer_logging = anyio.Event()

    @server.tool()
    async def racy(ctx: Context) -> str:
        tasks.start_soon(ctx.report_progress, 1, 2)  # from a task of the tool's own
        await progress_logging.wait()
        return "raced"

    app = ANPMiddleware(Starlette(), server=server, data_dir=tmp_path)
    async with serve(app) as base, httpx.AsyncClient() as http, anyio.create_task_group() as tasks:
        record = app.endpoint.record

        async def record_in_turn(session_id: str, event: Event) -> Event:
            if event.final:  # the answer is logged only after the progress was
                answer_logging.set()
                await progress_logged.wait()
            else:
                progress_logging.set()
                await answer_logging.wait()
            logged = await record(session_id, event)
            if not event.final:
                progress_logged.set()
            return logged

        app.endpoint.record = record_in_turn  # type: ignore[method-assign]
        client = RawClient(http)
        await client.initialize(base + "/mcp")
        message = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "racy", "arguments": {}, "_meta": {"progressToken": "p"}},
        }
        with anyio.fail_after(10):
            answer = await http.post(base + "/mcp", json=message, headers=client.headers())
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = sse_events(answer.text)
        assert events[0]["data"] is None and events[0]["id"]  # priming
        assert [event["data"].get("method") for event in events[1:]] == [
            "notifications/progress",
            None,
        ]
        assert events[-1]["data"]["result"]["content"][0]["text"] == "raced"
        assert all(event["id"] for event in events)


async def test_a_dropped_stream_nobody_can_resume_cancels_its_request(tmp_path: Path) -> None:
    """A 2025-06-18 client (SSE without event ids) leaves while its tool waits for a sampling
    answer: the request is cancelled instead of holding the session in flight for ever."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http, protocol="2025-06-18")
        await client.initialize(worker.url)
        call = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "ask"}}
        headers = client.headers()
        async with http.stream("POST", worker.url, json=call, headers=headers) as stream:
            async for line in stream.aiter_lines():
                if "sampling/createMessage" in line:
                    break
            assert worker.app.registry.in_flight == 1
        # the client is gone (its connection closed with the stream)

        async def settled() -> None:
            while worker.app.registry.in_flight:  # noqa: ASYNC110 (set by the server's task)
                await anyio.sleep(0.01)

        with anyio.fail_after(10):
            await settled()
        assert not worker.app.endpoint.live[client.session_id].running


@pytest.mark.parametrize("tool", ["body_size", "stream_size"])
@pytest.mark.parametrize(
    ("protocol", "accept"),
    [("2025-06-18", "application/json, text/event-stream"), (PROTOCOL, "application/json")],
)
async def test_a_handler_reads_the_body_of_a_watched_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str, accept: str, tool: str
) -> None:
    """A request nobody could resume is watched for its client leaving; the watch reads the
    body first and keeps it on the request, so a handler asking for it later still gets it,
    and a handler that read it as a stream first is not taken for a client that left."""
    monkeypatch.setattr(endpoint_module, "HOLD_SECONDS", 0.0)  # the watch starts at once
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http, protocol=protocol)
        await client.initialize(worker.url)
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": tool}}
        body = json.dumps(call).encode()
        headers = {**client.headers(), "Accept": accept, "Content-Type": "application/json"}
        answer = await http.post(worker.url, content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert result_text(answer_events(answer)) == str(len(body))


async def test_a_body_no_answer_could_echo_is_a_parse_error(tmp_path: Path) -> None:
    """An id with a lone surrogate escape parses with ``json.loads`` but could never be written
    back: refused as the SDK's transports refuse it (400, -32700), never a 500."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        body = b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}'
        for accept in ("application/json, text/event-stream", "application/json"):
            headers = {**client.headers(), "Accept": accept, "Content-Type": "application/json"}
            answer = await http.post(worker.url, content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == -32700


async def test_json_that_is_no_json_rpc_message_is_an_invalid_request(tmp_path: Path) -> None:
    """Valid JSON of the wrong shape in a session: 400 with -32600 (Invalid Request), as the
    session-less era answers it; -32700 (Parse error) is for a body that is not JSON."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        headers = {**client.headers(), "Content-Type": "application/json"}
        for body in (b"[]", b"1", b'{"jsonrpc":"2.0","id":true,"method":"ping"}', b'"x"'):
            answer = await http.post(worker.url, content=body, headers=headers)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == -32600, body
        answer = await http.post(worker.url, content=b"{not json", headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == -32700


async def test_a_sampling_answer_posted_to_the_other_worker_reaches_the_waiting_tool(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with workers(tmp_path, 2, redis_server) as (a, b), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        message = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "ask", "arguments": {}},
        }
        async with http.stream("POST", a.url, json=message, headers=client.headers()) as stream:
            lines = stream.aiter_lines()
            request = None
            async for line in lines:
                if line.startswith("data:") and line[5:].strip():
                    data = json.loads(line[5:])
                    if data.get("method") == "sampling/createMessage":
                        request = data
                        break
            assert request is not None
            assert str(request["id"]).startswith(a.app.endpoint.backplane.relay.worker)
            answer = {
                "jsonrpc": "2.0",
                "id": request["id"],
                "result": {
                    "role": "assistant",
                    "content": {"type": "text", "text": "from b"},
                    "model": "test",
                },
            }
            posted = await http.post(b.url, json=answer, headers=client.headers())
            assert posted.status_code == 202
            rest = "\n".join([line async for line in lines])
        assert result_text(sse_events(rest)) == "sampled: from b"


async def test_the_get_stream_carries_notifications_sent_by_another_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with workers(tmp_path, 2, redis_server) as (a, b), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", b.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            assert result_text(await client.call(a.url, 1, "touch")) == "touched"
            note = await first_message(standalone.aiter_lines())
            assert note["method"] == "notifications/resources/updated"
            assert note["params"] == {"uri": "test://thing"}


async def test_a_request_id_spelled_like_the_get_streams_name_is_just_a_request(
    tmp_path: Path,
) -> None:
    """A client may use any string as a request id: the one this package's GET stream is kept
    under internally too. The request's answer and the session's notifications still go where
    they belong."""
    async with workers(tmp_path, 1, None) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", a.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            answer = await client.call(a.url, STANDALONE, "touch")
            assert result_text(answer) == "touched"
            assert all(event["data"].get("id") == STANDALONE for event in answer if event["data"])
            note = await first_message(standalone.aiter_lines())
            assert note["method"] == "notifications/resources/updated"


async def test_an_id_reused_while_its_answer_is_being_logged_is_refused(tmp_path: Path) -> None:
    """A polled request's answer reaches its client through the log's relay before the log's
    write returns here (Redis publishes inside its script). Until it returns the request is in
    flight: its id reused then is refused (409), not handed the old answer with the new one
    lost."""
    published = anyio.Event()
    returned = anyio.Event()
    release = anyio.Event()

    class SlowAnswerLog(LocalBackplane):
        async def record(self, session_id: str, event: Event) -> Event:
            logged = await super().record(session_id, event)
            if event.final:
                published.set()
                await release.wait()
                returned.set()
            return logged

    gate = anyio.Event()
    server = MCPServer("reuse")

    @server.tool()
    async def poll(ctx: Context) -> str:
        await ctx.report_progress(1, 2, "started")
        await ctx.close_sse_stream()
        await gate.wait()
        return "old"

    @server.tool()
    async def fresh() -> str:
        return "new"

    app = ANPMiddleware(Starlette(), server=server, data_dir=tmp_path)
    app.endpoint.backplane = SlowAnswerLog()
    async with serve(app) as base, httpx.AsyncClient() as http:
        url = base + "/mcp"
        client = RawClient(http)
        await client.initialize(url)
        polled = await client.call(url, 5, "poll")  # closed for polling: no answer in it
        assert not any("result" in (event["data"] or {}) for event in polled)
        gate.set()
        with anyio.fail_after(10):
            await published.wait()
        message = {"jsonrpc": "2.0", "id": 5, "method": "tools/call"}
        message["params"] = {"name": "fresh", "arguments": {}}
        refused = await http.post(url, json=message, headers=client.headers())
        assert refused.status_code == 409
        release.set()
        with anyio.fail_after(10):
            await returned.wait()
        assert result_text(await client.call(url, 5, "fresh")) == "new"


async def test_a_resumed_get_stream_replaces_the_sessions_standalone_stream(
    tmp_path: Path,
) -> None:
    """A client that reconnects its GET stream with ``Last-Event-ID`` gets the session's one
    standalone stream: the earlier one ends (no message goes on two streams), and a fresh GET
    is still refused."""
    async with workers(tmp_path, 1, None) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", a.url, headers=client.headers()) as first:
            assert first.status_code == 200
            assert result_text(await client.call(a.url, 1, "touch")) == "touched"
            lines = first.aiter_lines()
            event_id = await id_of_first_message(lines)
            headers = client.headers(**{"Last-Event-ID": event_id})
            async with http.stream("GET", a.url, headers=headers) as resumed:
                assert resumed.status_code == 200
                with anyio.fail_after(10):
                    async for _ in lines:
                        pass  # the earlier stream ended
                fresh = await http.get(a.url, headers=client.headers())
                assert fresh.status_code == 409


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_standalone_stream_resumed_from_an_id_the_log_let_go_is_followed_on(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """Event ids name their stream: a client reconnecting its GET stream with the id of an
    event the log no longer keeps (expired after a quiet spell, or trimmed) gets the session's
    standalone stream back, with its later messages. Before, the id was unknown: the GET ended
    at once, and the official client reconnected with it every second, for good."""
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    prefix = f"gone-{uuid.uuid4().hex[:8]}:"
    async with workers(tmp_path, 1, redis, prefix=prefix) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", a.url, headers=client.headers()) as first:
            assert first.status_code == 200
            assert result_text(await client.call(a.url, 1, "touch")) == "touched"
            event_id = await id_of_first_message(first.aiter_lines())
        await a.app.endpoint.backplane.events.drop(client.session_id)  # as if it expired
        headers = client.headers(**{"Last-Event-ID": event_id})
        async with http.stream("GET", a.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            lines = resumed.aiter_lines()
            assert result_text(await client.call(a.url, 2, "touch")) == "touched"
            later = await id_of_first_message(lines)
        assert later != event_id


@pytest.mark.parametrize("where", ["holder", "other"])
async def test_closing_the_standalone_stream_reaches_the_worker_holding_it(
    tmp_path: Path, redis_server: RedisServer, where: str
) -> None:
    """``ctx.close_standalone_sse_stream()`` (SEP-1699 polling) ends the session's standalone
    stream whichever worker runs the tool (before, only a tool on the holding worker did)."""
    prefix = f"close-{uuid.uuid4().hex[:8]}:"
    async with (
        workers(tmp_path, 2, redis_server, prefix=prefix) as (a, b),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", b.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            lines = standalone.aiter_lines()
            async for line in lines:
                if line.startswith("id:"):
                    break  # primed: open on b
            runs_on = b if where == "holder" else a
            assert result_text(await client.call(runs_on.url, 5, "close_get")) == "closed"
            with anyio.fail_after(10):
                async for _ in lines:
                    pass  # ended


async def test_the_standalone_stream_is_one_per_session_across_workers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """No message goes on two streams: a fresh GET on another worker than the one holding the
    session's standalone stream is refused (409) as on the same worker; a GET resuming it with
    ``Last-Event-ID`` on another worker takes it over, and the earlier stream ends; once the
    holder's stream is gone, a fresh GET is served again."""
    async with session_on_two_workers(tmp_path, redis_server) as (a, b, http, client):
        async with http.stream("GET", a.url, headers=client.headers()) as first:
            assert first.status_code == 200
            refused = await http.get(b.url, headers=client.headers())
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"]["message"].startswith("Conflict")
            assert result_text(await client.call(b.url, 1, "touch")) == "touched"
            lines = first.aiter_lines()
            event_id = await id_of_first_message(lines)
            headers = client.headers(**{"Last-Event-ID": event_id})
            async with http.stream("GET", b.url, headers=headers) as resumed:
                assert resumed.status_code == 200
                with anyio.fail_after(10):
                    async for _ in lines:
                        pass  # the earlier stream, on the other worker, ended
                assert (await http.get(a.url, headers=client.headers())).status_code == 409
                assert result_text(await client.call(a.url, 2, "touch")) == "touched"
                note = await first_message(resumed.aiter_lines())
                assert note["method"] == "notifications/resources/updated"
        # the holder's stream closed: its claim goes with it (when its worker notices)
        with anyio.fail_after(10):
            while True:
                async with http.stream("GET", a.url, headers=client.headers()) as again:
                    if again.status_code == 200:
                        break
                    assert again.status_code == 409
                await anyio.sleep(0.05)


async def test_a_stream_lost_after_its_priming_event_is_resumed_on_the_other_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    gate = Gate()
    async with workers(tmp_path, 2, redis_server, gate) as (a, b), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        priming = await dropped_slow_call(http, client, a.url)
        # the client is gone; the call goes on (and keeps the session in flight)
        await gate.started.wait()
        assert a.app.registry.in_flight == 1
        headers = client.headers(**{"Last-Event-ID": priming})
        async with http.stream("GET", b.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            gate.released.set()
            body = "\n".join([line async for line in resumed.aiter_lines()])
        events = sse_events(body)
        assert [e["data"]["params"]["message"] for e in events[:-1]] == ["started"]
        assert result_text(events) == "slow done"
        # a second resume from the same point replays it all from the log
        again = await http.get(b.url, headers=headers)
        assert result_text(sse_events(again.text)) == "slow done"


async def test_a_request_stream_resumed_again_goes_on_the_later_get_only(tmp_path: Path) -> None:
    """No message goes on two streams: a second GET resuming the same request stream ends the
    first, and the answer comes on the second only."""
    gate = Gate()
    async with workers(tmp_path, 1, None, gate) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        headers = await resuming_a_dropped_call(http, client, a.url, gate)
        async with http.stream("GET", a.url, headers=headers) as first:
            assert first.status_code == 200
            async with http.stream("GET", a.url, headers=headers) as second:
                assert second.status_code == 200
                with anyio.fail_after(10):  # the first ended (before the answer)
                    earlier = "\n".join([line async for line in first.aiter_lines()])
                gate.released.set()
                body = "\n".join([line async for line in second.aiter_lines()])
        assert "slow done" not in earlier
        assert result_text(sse_events(body)) == "slow done"
        assert not a.app.endpoint._resumed


async def test_a_session_follows_a_bounded_number_of_resumed_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's id is checked for shape only (any worker may have issued it) and a GET
    resuming it waits up to ``RESUMED_SILENCE`` for its events: past ``MAX_RESUMED_STREAMS``
    of one session on one worker, a resume is refused (429, a JSON-RPC error) instead of
    holding one more connection. Resuming a stream already followed takes its place, and the
    bound is per session."""
    monkeypatch.setattr(endpoint_module, "MAX_RESUMED_STREAMS", 2)
    async with workers(tmp_path, 1, None) as (a,), httpx.AsyncClient() as http:
        client, other = RawClient(http), RawClient(http)
        await client.initialize(a.url)
        await other.initialize(a.url)

        def resuming(who: RawClient, n: int) -> dict[str, str]:
            return who.headers(**{"Last-Event-ID": priming_id("0", f"{'a' * 10}.1.{n}")})

        async with (
            http.stream("GET", a.url, headers=resuming(client, 1)) as one,
            http.stream("GET", a.url, headers=resuming(client, 2)) as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)
            refused = await http.get(a.url, headers=resuming(client, 3))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == -32000
            assert refused.json()["error"]["message"] == endpoint_module.TOO_MANY_STREAMS
            async with http.stream("GET", a.url, headers=resuming(client, 1)) as again:
                assert again.status_code == 200
                with anyio.fail_after(10):
                    async for _ in one.aiter_lines():
                        pass  # the earlier GET of that stream ended
            async with http.stream("GET", a.url, headers=resuming(other, 3)) as theirs:
                assert theirs.status_code == 200
            deleted = await http.delete(a.url, headers=client.headers())
            assert deleted.status_code == 204
            with anyio.fail_after(10):
                async for _ in two.aiter_lines():
                    pass  # the session's streams end with it
        with anyio.fail_after(10):
            while a.app.endpoint._resumed:  # noqa: ASYNC110 (each GET's end runs a moment later)
                await anyio.sleep(0.01)


async def test_a_resumed_stream_with_no_events_of_its_own_ends_in_a_busy_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET resuming a request stream whose answer never comes (its worker died, or the id
    names no stream) ends after ``RESUMED_SILENCE`` without an event of that stream, however
    many events the session's other requests send meanwhile (before, each of them restarted the
    wait, and with no gap longer than a keepalive the GET never ended)."""
    monkeypatch.setattr(endpoint_module, "KEEPALIVE_SECONDS", 0.5)
    monkeypatch.setattr(endpoint_module, "RESUMED_SILENCE", 1.0)
    async with workers(tmp_path, 1, None) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        headers = client.headers(**{"Last-Event-ID": priming_id("0", f"{'a' * 10}.1.1")})
        calls = 0

        async def busy() -> None:  # other requests' events, back to back
            nonlocal calls
            while True:
                calls += 1
                assert result_text(await client.call(a.url, 100 + calls, "chatty")) == "chatted"

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(busy)
            async with http.stream("GET", a.url, headers=headers) as resumed:
                assert resumed.status_code == 200
                with anyio.fail_after(20):
                    async for _ in resumed.aiter_lines():
                        pass  # ended by the server
            tasks.cancel_scope.cancel()
        assert calls > 1


async def test_a_lost_relay_connection_ends_its_streams_which_resume_from_the_log(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What is published while a worker's relay connection is down never reaches that worker:
    its streams end when it sees the loss (before, a resumed request stream waited on for an
    answer that had gone by), and the client's next resume, from the log, has everything."""
    gate = Gate()
    prefix = f"gap-{uuid.uuid4().hex[:8]}:"
    async with (
        workers(tmp_path, 2, redis_server, gate, prefix=prefix) as (a, b),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        headers = await resuming_a_dropped_call(http, client, a.url, gate)
        async with http.stream("GET", b.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            lines = resumed.aiter_lines()
            async for line in lines:
                if '"started"' in line:
                    break  # replayed: b follows the stream
            killer = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                await killer.client_kill_filter(_type="pubsub")  # every worker's relay
            finally:
                await killer.aclose()
            with anyio.fail_after(10):
                rest = [line async for line in lines]  # ended: the answer is not sent yet
        assert not any("slow done" in line for line in rest)
        gate.released.set()
        with anyio.fail_after(10):
            while True:
                again = await http.get(b.url, headers=headers)
                if again.status_code == 200:
                    break
                assert again.status_code == 503  # (the relay reconnecting)
                await anyio.sleep(0.1)
        assert result_text(sse_events(again.text)) == "slow done"


async def test_ending_the_session_tears_its_streams_and_events_down(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with workers(tmp_path, 2, redis_server) as (a, b), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        await client.call(a.url, 1, "chatty")
        async with http.stream("GET", b.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            deleted = await http.delete(a.url, headers=client.headers())
            assert deleted.status_code == 204
            with anyio.fail_after(10):
                async for _ in standalone.aiter_lines():
                    pass  # the stream ends with the session, on the other worker too
        assert not b.app.endpoint._streams
        log = await redis_server_keys(redis_server, f"fidelity:log:{client.session_id}")
        assert log == 0


@pytest.mark.parametrize("ending", ["DELETE", "cooled"])
async def test_a_dropped_sessions_machinery_is_freed_without_the_garbage_collector(
    tmp_path: Path, ending: str
) -> None:
    """The SDK's connection points back at the session's machinery, which holds it: a cycle
    only the garbage collector would free, long after (by then in its oldest generation). Once
    the machinery is dropped with nothing running, it is freed as its last reference goes."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        await client.call(worker.url, 1, "chatty")
        endpoint = worker.app.endpoint
        live = weakref.ref(endpoint.live[client.session_id])
        connection = weakref.ref(endpoint.live[client.session_id].connection)
        gc.disable()
        try:
            if ending == "DELETE":
                deleted = await http.delete(worker.url, headers=client.headers())
                assert deleted.status_code == 204
            else:
                assert endpoint.release_idle(now=math.inf) == 1
            assert client.session_id not in endpoint.live
            assert live() is None
            assert connection() is None
        finally:
            gc.enable()


async def test_shutting_down_lets_go_of_every_sessions_machinery(tmp_path: Path) -> None:
    """A worker that stops closes its sessions' machinery and keeps none of it: an app started
    again in the same process builds what it needs anew."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        await client.call(worker.url, 1, "chatty")
        endpoint = worker.app.endpoint
        live = weakref.ref(endpoint.live[client.session_id])
    assert not endpoint.live and not endpoint._warm and not endpoint._by_instance
    gc.collect()
    assert live() is None


async def test_a_request_reaching_ended_machinery_is_answered_session_ended(
    tmp_path: Path,
) -> None:
    """The session ended between the middleware's lookup and the request's start: the answer is
    'Session ended', and no handler runs on the ended session (nor does a notification)."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        endpoint = worker.app.endpoint
        (state,) = worker.app.registry.live_sessions()
        live = LiveSession(endpoint, state, 10_000)
        live.close()
        written: list[str | None] = []

        class Keeper:
            unseen = True

            async def write(self, event: Event) -> None:
                written.append(event.payload)

        for request_id, method in enumerate(["tools/list", "tools/call", "nope/unknown"]):
            params = {"name": "whoami", "arguments": {}} if method == "tools/call" else None
            request = JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=params)
            assert live.begin(request, Keeper(), resumable=False)
            await live.serve(request, ServerMessageMetadata(can_send_request=False))
            live.end(str(request_id))
            answer = json.loads(written[-1] or "")
            assert answer["id"] == request_id
            assert answer["error"] == {"code": -32000, "message": "Session ended"}
        assert not live.writers and not live.running
        await live.notification(
            JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")
        )


async def test_a_deleted_sessions_event_log_goes_in_the_script_that_removes_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """No worker spends a round trip of its own on the log of a session ended by DELETE: the
    store's removal script deletes it with the record."""
    async with workers(tmp_path, 2, redis_server) as (a, b), httpx.AsyncClient() as http:
        dropped: list[str] = []
        for worker in (a, b):

            async def drop(session_id: str) -> None:
                dropped.append(session_id)

            worker.app.endpoint.backplane.events.drop = drop  # type: ignore[method-assign]
        client = RawClient(http)
        await client.initialize(a.url)
        await client.call(b.url, 1, "chatty")  # logged events
        log = f"fidelity:log:{client.session_id}"
        assert await redis_server_keys(redis_server, log) == 1
        assert (await http.delete(a.url, headers=client.headers())).status_code == 204
        with anyio.fail_after(10):  # until the other worker heard of the end (its notice)
            while client.session_id in b.app.endpoint.live:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert await redis_server_keys(redis_server, log) == 0
        assert dropped == []


async def test_a_session_removed_by_any_registry_takes_its_event_log(
    redis_server: RedisServer,
) -> None:
    """The store knows where the backplane keeps a session's log (one layout, checked here),
    so a removal from anywhere (an admin script's registry with no MCP endpoint) deletes it."""
    store = RedisSessionStore.from_url(redis_server.url, prefix="anywhere:")
    try:
        backplane = RedisBackplane(store.client, prefix=store.prefix)
        assert store.event_log_key("abc") == backplane.events.key("abc")
        registry = SessionRegistry(store=store, session_timeout=60.0)
        state = registry.new_session(SessionConfig(principal="alice"))
        await registry.register(state)
        await backplane.record(state.session_id, Event("s", None, '{"note":1}'))
        log = store.event_log_key(state.session_id)
        assert await store.client.exists(log) == 1
        assert await registry.remove(state.session_id, reason="revoked")
        assert await store.client.exists(log) == 0
    finally:
        await store.aclose()


async def redis_server_keys(redis: RedisServer, key: str) -> int:
    store = RedisSessionStore.from_url(redis.url)
    try:
        return int(await store.client.exists(key))
    finally:
        await store.aclose()


async def test_the_official_client_in_legacy_mode_gets_progress_logs_and_its_answers(
    tmp_path: Path,
) -> None:
    async with workers(tmp_path, 1, None) as (worker,):
        logs: list[types.LoggingMessageNotificationParams] = []
        reported: list[tuple[float, float | None, str | None]] = []

        async def sampling(
            context: ClientRequestContext, params: types.CreateMessageRequestParams
        ) -> types.CreateMessageResult:
            text = types.TextContent(type="text", text="pong")
            return types.CreateMessageResult(role="assistant", content=text, model="m")

        async def elicitation(
            context: ClientRequestContext, params: types.ElicitRequestParams
        ) -> types.ElicitResult:
            return types.ElicitResult(action="accept", content={"color": "teal"})

        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            logs.append(params)

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            reported.append((progress, total, message))

        async with mcp.Client(
            worker.url,
            mode="legacy",
            sampling_callback=sampling,
            elicitation_callback=elicitation,
            logging_callback=on_log,
        ) as client:
            called = await client.call_tool("chatty", {}, progress_callback=on_progress)
            assert called.content[0].text == "chatted"  # type: ignore[union-attr]
            assert [p[2] for p in reported] == ["half", "done"]
            assert [entry.data for entry in logs] == ["a warning", "a debug line"]
            asked = await client.call_tool("ask", {})
            assert asked.content[0].text == "sampled: pong"  # type: ignore[union-attr]
            picked = await client.call_tool("pick", {})
            assert picked.content[0].text == "accept: teal"  # type: ignore[union-attr]


async def test_a_priming_id_replays_its_own_stream_only_and_bad_ids_replay_nothing() -> None:
    """Priming ids are written nowhere: the log's cursor and the stream's log name (never client
    text, which could break the SSE framing) are enough to replay a stream."""
    log = MemoryEventLog()
    await log.append("s1", "aaaaaaaaaa.1.1", '{"early": true}')
    primed = priming_id(log.anchor("s1"), "aaaaaaaaaa.1.2")
    await log.append("s1", "aaaaaaaaaa.1.3", '{"other": true}')
    later = await log.append("s1", "aaaaaaaaaa.1.2", '{"mine": true}', True)
    found = await log.after("s1", primed)
    assert found is not None
    stream, events = found
    assert stream == "aaaaaaaaaa.1.2"
    assert [(e.event_id, e.payload, e.final) for e in events] == [(later, '{"mine": true}', True)]
    # (Superscript digits are digits to str.isdigit, and int() refuses them: not an outage.)
    bad_ids = ("", "x~aaaaaaaaaa.1.2", "1~client\nid", "1~aaaaaaaaaa.1", "999", "\xb2")
    for bad in (*bad_ids, "\xb2~aaaaaaaaaa.1.2", "9" * 5000):
        assert await log.after("s1", bad) is None, bad
    assert await log.after("another session", primed) == ("aaaaaaaaaa.1.2", [])


async def test_stream_ids_redis_would_refuse_are_unknown_ids_not_an_outage(
    redis_server: RedisServer,
) -> None:
    """A ``Last-Event-ID`` of the stream-id shape but out of Redis's range (or the very last
    id, after which nothing can come) replays nothing, without a command Redis refuses (which
    was logged as the event log being unavailable)."""
    store = RedisSessionStore.from_url(redis_server.url, prefix=f"ids-{uuid.uuid4().hex}:")
    log = RedisEventLog(store.client, prefix=store.prefix)
    first = await log.append("s1", "aaaaaaaaaa.1.1", "{}")
    top = 2**64 - 1
    for bad in (
        f"{top + 1}-0",
        f"1-{top + 1}",
        f"{top}-{top}",
        priming_id(f"{top + 1}-0", "aaaaaaaaaa.1.1"),
        priming_id(f"{top}-{top}", "aaaaaaaaaa.1.1"),
    ):
        assert await log.after("s1", bad) is None, bad
    assert await log.after("s1", first) == ("aaaaaaaaaa.1.1", [])
    await store.aclose()


async def test_a_log_begun_again_after_its_retention_still_replays_from_a_priming_id() -> None:
    """Event numbers never restart: a request silent for longer than the retention, whose
    session's log was purged and begun again, still has its answer replayed."""
    now = [0.0]
    log = MemoryEventLog(retention=10.0, clock=lambda: now[0])
    for _ in range(5):
        await log.append("s1", "aaaaaaaaaa.1.1", "{}")
    primed = priming_id(log.anchor("s1"), "aaaaaaaaaa.1.2")
    now[0] = 60.0  # the log is purged with the next append, which begins it again
    answer = await log.append("s1", "aaaaaaaaaa.1.2", '{"answer": 1}', True)
    found = await log.after("s1", primed)
    assert found is not None and [e.event_id for e in found[1]] == [answer]


async def test_a_listener_too_far_behind_is_ended_rather_than_silently_skipped() -> None:
    relay = LocalRelay()
    async with relay.listen("s1") as events:
        for n in range(LISTENER_BUFFER + 1):
            await relay.publish("s1", Event("x", str(n), "{}"))
        received = [event async for event in events]  # the buffered ones, then the end
    assert [e.event_id for e in received] == [str(n) for n in range(LISTENER_BUFFER)]


async def test_a_second_listener_waits_for_the_pending_subscription(
    redis_server: RedisServer,
) -> None:
    """Two GET streams of one session open on one worker at once: the second must not replay the
    log before Redis confirmed the channel's subscription either, or an event published between
    its replay and the confirmation would reach neither."""
    client = RedisSessionStore.from_url(redis_server.url, prefix="pending:").client
    relay = RedisRelay(client, prefix="pending:")
    relay._pubsub = client.pubsub()  # no reader: the confirmation stays pending until set here
    joined: list[str] = []

    async def join(name: str, leave: anyio.Event) -> None:
        async with relay.listen("s1"):
            joined.append(name)
            await leave.wait()

    leave = anyio.Event()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(join, "first", leave)
        with anyio.fail_after(10):
            while relay.channel("s1") not in relay._confirmed:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        tasks.start_soon(join, "second", leave)
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert joined == []  # both wait for the one subscription
        relay._confirmed[relay.channel("s1")].set()
        with anyio.fail_after(10):
            while len(joined) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        leave.set()
    await relay._pubsub.aclose()
    await client.aclose()


async def test_a_listen_whose_subscription_failed_or_was_cut_short_leaves_nothing(
    redis_server: RedisServer,
) -> None:
    """A GET's subscription that Redis refused (away for a moment), or that was cut short while
    it waited for the confirmation (a take-over, the session's end), leaves no pending
    confirmation behind: before, one stayed for each such session, for good."""
    client = RedisSessionStore.from_url(redis_server.url, prefix="cut:").client
    relay = RedisRelay(client, prefix="cut:")
    relay._pubsub = client.pubsub()  # no reader: a confirmation stays pending

    async def away(*channels: str) -> None:
        raise ConnectionError("Redis away")

    subscribe = relay._pubsub.subscribe
    relay._pubsub.subscribe = away
    for n in range(3):
        with pytest.raises(ConnectionError):
            async with relay.listen(f"s{n}"):
                pass
    relay._pubsub.subscribe = subscribe
    with anyio.move_on_after(0.05):  # cut short while waiting for its confirmation
        async with relay.listen("cut"):
            pytest.fail("not confirmed: never listening")
    assert relay._confirmed == {}
    assert relay._listeners == {}
    await relay._pubsub.aclose()
    await client.aclose()


async def test_once_its_streams_are_ended_for_a_stop_a_worker_opens_no_more(
    tmp_path: Path,
) -> None:
    """A server told to stop still serves what its open connections send; a GET stream opened
    then would hold its stop again, so it is refused (503, a JSON-RPC error) and the client
    goes to another worker. Requests are still served."""
    async with workers(tmp_path, 1, None) as (a,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", a.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            a.app.endpoint.end_streams()
            with anyio.fail_after(10):
                async for _ in standalone.aiter_lines():
                    pass  # ended
        refused = await http.get(a.url, headers=client.headers())
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "Server shutting down"
        assert result_text(await client.call(a.url, 2, "touch")) == "touched"


class GatedRelay(LocalRelay):
    """Claims of the standalone stream wait at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming, self.gate = anyio.Event(), anyio.Event()

    async def claim_standalone(self, session_id: str, token: str, *, take_over: bool) -> bool:
        self.claiming.set()
        await self.gate.wait()
        return await super().claim_standalone(session_id, token, take_over=take_over)


class GatedLog(MemoryEventLog):
    """Resumes wait at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.reading, self.gate = anyio.Event(), anyio.Event()

    async def after(self, session_id: str, event_id: str) -> tuple[str, list[Event]] | None:
        self.reading.set()
        await self.gate.wait()
        return await super().after(session_id, event_id)


@pytest.mark.parametrize("waits_in", ["claim", "replay"])
async def test_a_get_under_way_when_the_server_stops_is_503_not_404(
    tmp_path: Path, waits_in: str
) -> None:
    """A GET still claiming its stream or reading the log when the server is told to stop is
    answered 503 (the client goes to another worker), never opened (it would hold the stop)
    and never 404: its session is alive, and a 404 tells a client to start a new one."""
    relay, log = GatedRelay(), GatedLog()
    app = ANPMiddleware(Starlette(), server=fidelity_server(), data_dir=tmp_path)
    app.endpoint.backplane = LocalBackplane(events=log, relay=relay)
    async with serve(app) as base, httpx.AsyncClient() as http:
        url = base + "/mcp"
        client = RawClient(http)
        await client.initialize(url)
        if waits_in == "claim":
            headers, waiting = client.headers(), relay.claiming
        else:
            resume = priming_id("0", STANDALONE)
            headers, waiting = client.headers(**{"Last-Event-ID": resume}), log.reading
        async with anyio.create_task_group() as tasks:
            answers: list[httpx.Response] = []

            async def get() -> None:
                answers.append(await http.get(url, headers=headers))

            tasks.start_soon(get)
            with anyio.fail_after(10):
                await waiting.wait()
            app.endpoint.end_streams()
            relay.gate.set()
            log.gate.set()
        assert answers[0].status_code == 503
        assert answers[0].json()["error"]["message"] == endpoint_module.SHUTTING_DOWN
        assert not app.endpoint._streams and not app.endpoint._standalone


async def test_a_reply_the_relay_cannot_read_does_not_stop_it(redis_server: RedisServer) -> None:
    """Bytes that are no UTF-8 on a relay channel (another publisher's) made every later read
    fail with the connection still up: the relay reported a lost connection every 0.5 s for
    good, and its streams went silent. The connection is started afresh: the streams end
    (their clients resume from the log) and what comes after is delivered."""
    client = RedisSessionStore.from_url(redis_server.url, prefix="bad:").client
    relay, other = RedisRelay(client, prefix="bad:"), RedisRelay(client, prefix="bad:")

    async def ignore(note: Note) -> None:
        pass

    raw = redis.asyncio.Redis.from_url(redis_server.url)  # (bytes as they are)
    try:
        async with anyio.create_task_group() as tasks:
            await relay.start(ignore, tasks)
            async with relay.listen("s1") as events:
                await raw.publish(relay.channel("s1"), b"\xff")
                with anyio.fail_after(10):
                    async for _ in events:
                        pass  # ended, once the relay was connected again
            async with relay.listen("s1") as events:
                await other.publish("s1", Event(STANDALONE, "1", "{}"))
                with anyio.fail_after(10):
                    delivered = await events.receive()
            assert delivered.payload == "{}"
            tasks.cancel_scope.cancel()
    finally:
        await relay.aclose()
        await raw.aclose()
        await client.aclose()


async def test_a_memory_log_after_a_restart_goes_on_past_the_ids_of_the_one_before() -> None:
    """A session restored from the state file is resumed from ids of the process before the
    restart: the events logged since must come after them (the count started at 0 in every
    process, and a client's old cursor hid them)."""
    before = MemoryEventLog()
    await before.append("s1", STANDALONE, "{}")
    cursor = await before.append("s1", STANDALONE, "{}")
    after_restart = MemoryEventLog()
    await after_restart.append("s1", STANDALONE, '{"new": 1}')
    found = await after_restart.after("s1", priming_id(cursor, STANDALONE))
    assert found is not None
    assert [event.payload for event in found[1]] == ['{"new": 1}']


class FailsOnce(MemoryEventLog):
    """The log refuses one event (Redis away for a moment)."""

    fail_next = False

    async def append(
        self, session_id: str, stream: str, payload: str | None, final: bool = False
    ) -> str:
        if self.fail_next and payload is not None:
            self.fail_next = False
            raise ConnectionError("log away for a moment")
        return await super().append(session_id, stream, payload, final)


async def test_an_event_the_log_refused_goes_out_without_an_id(tmp_path: Path) -> None:
    """An event the log could not take goes out with no id, so the client keeps the last id it
    can resume from (before the ids named their stream, that was how it went; then for a
    moment such an event got an id with no cursor, which named nothing a resume could find)."""
    gate, log = Gate(), FailsOnce()
    app = ANPMiddleware(Starlette(), server=fidelity_server(gate), data_dir=tmp_path)
    app.endpoint.backplane = LocalBackplane(events=log)
    async with serve(app) as base, httpx.AsyncClient() as http:
        url = base + "/mcp"
        client = RawClient(http)
        await client.initialize(url)
        log.fail_next = True  # the progress event
        message = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "slow", "arguments": {}, "_meta": {"progressToken": "p"}},
        }
        ids: list[str] = []
        async with http.stream("POST", url, json=message, headers=client.headers()) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id:"):
                    ids.append(line[3:].strip())
                if line.startswith("data:") and "started" in line:
                    break  # the client drops after the progress event
        assert len(ids) == 1  # the priming event's
        await gate.started.wait()
        gate.released.set()
        with anyio.fail_after(10):
            resumed = await http.get(url, headers=client.headers(**{"Last-Event-ID": ids[0]}))
        assert result_text(sse_events(resumed.text)) == "slow done"


async def test_a_get_for_a_session_that_ended_meanwhile_is_answered_404(tmp_path: Path) -> None:
    """The middleware found the session, then it ended before the endpoint opened its stream:
    a JSON-RPC 404, and no stream held open for a session that is gone."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        registry = worker.app.registry
        (state,) = registry.live_sessions()
        endpoint = worker.app.endpoint
        state.closed = True
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/mcp",
            "headers": [(b"accept", b"text/event-stream")],
            "state": {"mcp_session": state},
        }
        sent: list[Message] = []

        async def receive() -> Message:
            await anyio.sleep_forever()  # a client that stays
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)

        with anyio.fail_after(10):
            await endpoint(scope, receive, send)
        assert sent[0]["status"] == 404
        assert json.loads(sent[1]["body"])["error"]["message"] == "Session not found"
        assert not endpoint._streams


async def test_a_handshake_session_refuses_a_request_in_the_session_less_envelope(
    tmp_path: Path,
) -> None:
    """As the SDK's own handshake-era driver does: a request carrying the 2026-07-28 envelope
    on a session opened with ``initialize`` is refused, not served under the wrong era."""
    async with workers(tmp_path, 1, None) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        message = {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {
                "name": "whoami",
                "arguments": {},
                "_meta": {PROTOCOL_VERSION_META_KEY: "2026-07-28"},
            },
        }
        answer = await http.post(worker.url, json=message, headers=client.headers())
        events = answer_events(answer)
        assert events[-1]["data"]["error"]["code"] == -32600
        # the id is free again, and the session still serves plain requests
        assert json.loads(result_text(await client.call(worker.url, 5, "whoami")))["client"]


async def test_a_standalone_stream_claim_is_held_by_one_get_at_a_time(
    redis_server: RedisServer,
) -> None:
    """The claim behind "one standalone stream per session" on every worker: a second claim is
    refused; only the holder renews or drops it, and a holder whose claim was lost (a Redis
    restart) takes it again when it renews; a take-over moves it and tells the other workers'
    listeners who holds it now."""
    prefix = f"claim-{uuid.uuid4().hex[:8]}:"
    client = RedisSessionStore.from_url(redis_server.url, prefix=prefix).client
    one, other = RedisRelay(client, prefix=prefix), RedisRelay(client, prefix=prefix)

    async def ignore(note: Note) -> None:
        return None

    try:
        async with anyio.create_task_group() as tasks:
            await one.start(ignore, tasks)
            assert await one.claim_standalone("s1", "a.1", take_over=False)
            assert await client.pttl(f"{prefix}get:s1") > 0
            assert not await other.claim_standalone("s1", "b.1", take_over=False)
            assert await other.claim_standalone("s2", "b.1", take_over=False)  # another session
            assert not await other.keep_standalone("s1", "b.1")
            await other.release_standalone("s1", "b.1")  # not the holder: nothing happens
            assert await one.keep_standalone("s1", "a.1")
            await client.delete(f"{prefix}get:s1")  # lost (a restart without persistence)
            assert await one.keep_standalone("s1", "a.1")  # taken again: nobody else held it
            async with one.listen("s1") as events:
                assert await other.claim_standalone("s1", "b.2", take_over=True)
                with anyio.fail_after(10):
                    told = await events.receive()  # over pub/sub, from the other worker
            assert told == Event(OWNER_STREAM, None, "b.2")
            assert not await one.keep_standalone("s1", "a.1")
            await other.release_standalone("s1", "b.2")
            # told it was taken over, and the GET that did has ended: not taken again
            assert not await one.keep_standalone("s1", "a.1", again=False)
            assert await one.claim_standalone("s1", "c.1", take_over=False)
            await one.aclose()
            tasks.cancel_scope.cancel()
    finally:
        await client.aclose()


async def standalone_event_id(http: httpx.AsyncClient, client: RawClient, url: str) -> str:
    """Open the session's standalone stream, have a notification sent on it, and close it: the
    id to resume it from."""
    async with http.stream("GET", url, headers=client.headers()) as first:
        assert first.status_code == 200
        assert result_text(await client.call(url, 90, "touch")) == "touched"
        return await id_of_first_message(first.aiter_lines())


async def test_a_get_taken_over_before_it_listened_is_refused(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A fresh GET claims the standalone stream, and a GET resuming it on another worker takes
    it over before the first one's worker listens to the session (where the take-over notice
    goes): the first is refused (409) once it listens, so no message goes on both."""
    async with session_on_two_workers(tmp_path, redis_server) as (a, b, http, client):
        relay = a.app.endpoint.backplane.relay
        listen, claim, release = relay.listen, relay.claim_standalone, relay.release_standalone
        gate, claimed, answered, released = (anyio.Event() for _ in range(4))

        async def signalled_release(session_id: str, token: str) -> None:
            await release(session_id, token)
            released.set()

        relay.release_standalone = signalled_release  # type: ignore[method-assign]
        event_id = await standalone_event_id(http, client, a.url)
        with anyio.fail_after(10):
            await released.wait()  # (that stream's end is seen on its worker)

        async def signalled_claim(session_id: str, token: str, *, take_over: bool) -> bool:
            held = await claim(session_id, token, take_over=take_over)
            claimed.set()
            return held

        @asynccontextmanager
        async def held_listen(session_id: str) -> AsyncIterator[Any]:
            await gate.wait()
            async with listen(session_id) as events:
                yield events

        relay.claim_standalone = signalled_claim  # type: ignore[method-assign]
        relay.listen = held_listen  # type: ignore[method-assign]
        async with anyio.create_task_group() as tasks:
            answers: list[httpx.Response] = []

            async def fresh() -> None:
                answers.append(await http.get(a.url, headers=client.headers()))
                answered.set()

            tasks.start_soon(fresh)
            with anyio.fail_after(10):
                await claimed.wait()
            headers = client.headers(**{"Last-Event-ID": event_id})
            async with http.stream("GET", b.url, headers=headers) as resumed:
                assert resumed.status_code == 200
                gate.set()
                with anyio.fail_after(10):
                    await answered.wait()
                assert answers[0].status_code == 409, answers[0].text


async def test_a_standalone_stream_resumes_from_its_first_event_on_any_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The standalone stream opens with a priming event: a client whose stream died before
    anything was sent on it still has an id to resume it from, on any worker (which takes the
    stream over), instead of a fresh GET refused while the dead one holds the stream."""
    async with (
        session_on_two_workers(tmp_path, redis_server) as (a, b, http, client),
        http.stream("GET", a.url, headers=client.headers()) as first,
    ):
        assert first.status_code == 200
        lines = first.aiter_lines()
        with anyio.fail_after(10):
            async for line in lines:
                if line.startswith("id:"):
                    primed = line[3:].strip()
                    break
        assert primed.endswith("~" + STANDALONE)
        headers = client.headers(**{"Last-Event-ID": primed})
        async with http.stream("GET", b.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            with anyio.fail_after(10):
                async for _ in lines:
                    pass  # the earlier stream ended
            assert result_text(await client.call(a.url, 1, "touch")) == "touched"
            note = await first_message(resumed.aiter_lines())
            assert note["method"] == "notifications/resources/updated"


@pytest.mark.parametrize("shared", [False, True])
async def test_a_get_whose_session_ends_while_it_claims_is_not_found(
    tmp_path: Path, redis_server: RedisServer, shared: bool
) -> None:
    """The session ends (a DELETE) while a fresh GET is claiming its standalone stream: the GET
    gets 404 and holds nothing (nor, with Redis, the claim), instead of a stream of a session
    gone."""
    prefix = f"ends-{uuid.uuid4().hex[:8]}:"
    redis = redis_server if shared else None
    async with (
        workers(tmp_path, 1, redis, prefix=prefix) as (a,),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        relay = a.app.endpoint.backplane.relay
        claim, gate, claiming = relay.claim_standalone, anyio.Event(), anyio.Event()

        async def held_claim(session_id: str, token: str, *, take_over: bool) -> bool:
            claiming.set()
            await gate.wait()
            return await claim(session_id, token, take_over=take_over)

        relay.claim_standalone = held_claim  # type: ignore[method-assign]
        async with anyio.create_task_group() as tasks:
            answers: list[httpx.Response] = []

            async def fresh() -> None:
                answers.append(await http.get(a.url, headers=client.headers()))

            tasks.start_soon(fresh)
            with anyio.fail_after(10):
                await claiming.wait()
            assert (await http.delete(a.url, headers=client.headers())).status_code == 204
            gate.set()
        assert answers[0].status_code == 404, answers[0].text
        assert not a.app.endpoint._standalone and not a.app.endpoint._streams
    if shared:
        assert await redis_server_keys(redis_server, f"{prefix}get:{client.session_id}") == 0


async def test_an_open_stream_does_not_keep_its_session_past_its_maximum_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open GET stream holds its session as a running request does; past the session's
    maximum age the stream ends (at its next keepalive), and the session with it, instead of
    the stream keeping it for good."""
    monkeypatch.setattr(endpoint_module, "KEEPALIVE_SECONDS", 0.02)
    clock = ManualClock()
    policy = SessionPolicy(max_age=100.0)
    async with (
        workers(tmp_path, 1, None, clock=clock, policy=policy) as (a,),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        async with http.stream("GET", a.url, headers=client.headers()) as standalone:
            assert standalone.status_code == 200
            lines = standalone.aiter_lines()
            keepalives = 0
            with anyio.fail_after(10):
                async for line in lines:  # not yet past its age: the stream goes on
                    keepalives += line.startswith(":")
                    if keepalives == 3:
                        break
            clock.advance(101)
            with anyio.fail_after(10):
                async for _ in lines:
                    pass  # the stream ends
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        gone = await http.post(a.url, json=ping, headers=client.headers())
        assert gone.status_code == 404, gone.text
        with anyio.fail_after(10):  # (the stream's request ends a moment after its last byte)
            while not a.app.registry.stats.removed["max_age"]:  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def test_a_resumed_request_stream_still_gets_its_answer_past_the_maximum_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running request is never cut off by its session's maximum age, nor is the stream
    that resumed it: the answer arrives on it."""
    monkeypatch.setattr(endpoint_module, "KEEPALIVE_SECONDS", 0.02)
    clock, gate = ManualClock(), Gate()
    policy = SessionPolicy(max_age=100.0)
    async with (
        workers(tmp_path, 1, None, gate, clock=clock, policy=policy) as (a,),
        httpx.AsyncClient() as http,
    ):
        client = RawClient(http)
        await client.initialize(a.url)
        headers = await resuming_a_dropped_call(http, client, a.url, gate)
        async with http.stream("GET", a.url, headers=headers) as resumed:
            assert resumed.status_code == 200
            lines = resumed.aiter_lines()
            keepalives = 0
            with anyio.fail_after(10):
                async for line in lines:
                    keepalives += line.startswith(":")
                    if keepalives == 1:
                        break
            clock.advance(101)
            with anyio.fail_after(10):
                async for line in lines:
                    keepalives += line.startswith(":")
                    if keepalives == 4:  # several checkpoints past the age: still open
                        break
            gate.released.set()
            body = "\n".join([line async for line in lines])
        assert result_text(sse_events(body)) == "slow done"
