"""The official SDK's MCP server with full sessions, on any worker, behind the session middleware.

The middleware owns session ids, lifetimes and the store; this endpoint owns what an MCP session
is for. In the handshake era (2025-11-25 and earlier) every request of a session is served by a
:class:`~mcp2anp_middleware.mcp_hosting.live_session.LiveSession` on the worker it reached, built
from the session's stored handshake; responses stream as SSE (events logged for ``Last-Event-ID``
resumption); a GET opens the standalone stream; a client's answer to a server→client request and
a cancellation are relayed to the worker running the request. In the session-less era
(2026-07-28) each request goes to the SDK's own single-exchange entry, with request state sealed
under a key every worker shares (:mod:`~mcp2anp_middleware.mcp_hosting.request_state`).

Workers share all of this through a :class:`~mcp2anp_middleware.mcp_hosting.backplane.Backplane`:
in process with the memory store, over Redis with the Redis store (chosen when the middleware
binds its registry, so a host that passes only a store gets the matching one).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from http import HTTPStatus
from typing import Any, NamedTuple

import anyio
import pydantic_core
from mcp.server._streamable_http_modern import handle_modern_request
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import ServerMessageMetadata
from mcp_types import (
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from mcp_types.version import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    KNOWN_PROTOCOL_VERSIONS,
    is_version_at_least,
)
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from mcp2anp_middleware.mcp_hosting.backplane import (
    KEEPALIVE_SECONDS,
    OWNER_STREAM,
    Backplane,
    Event,
    LocalBackplane,
    Note,
    parse_priming_id,
    priming_id,
    wire_event,
)
from mcp2anp_middleware.mcp_hosting.handshake import Handshake
from mcp2anp_middleware.mcp_hosting.initialize import InitializeAnswers
from mcp2anp_middleware.mcp_hosting.live_session import STANDALONE, LiveSession, request_stream
from mcp2anp_middleware.mcp_hosting.request_state import SharedRequestState
from mcp2anp_middleware.mcp_hosting.sse import (
    HOLD_SECONDS,
    HoldTimer,
    SSEWriter,
    send_json,
)
from mcp2anp_middleware.mcp_hosting.tracing import spans_when_traced
from mcp2anp_middleware.sessions.events import SessionEvent, SessionEventKind
from mcp2anp_middleware.sessions.jsonrpc_errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    send_jsonrpc_error,
)
from mcp2anp_middleware.sessions.middleware import MESSAGE_SCOPE_KEY, SESSION_GONE
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.request_headers import (
    HEADERS_SCOPE_KEY,
    RequestHeaders,
    request_headers,
)
from mcp2anp_middleware.sessions.state import SessionState

_RESUMABLE_VERSIONS = frozenset(
    v for v in KNOWN_PROTOCOL_VERSIONS if is_version_at_least(v, "2025-11-25")
)
"""Protocol versions whose request streams carry event ids (resumable), worked out once."""

logger = logging.getLogger("mcp2anp_middleware.mcp_hosting")

SESSION_SCOPE_KEY = "mcp_session"
CONFLICTING_STREAM = "Conflict: only one standalone stream per session"
RESUMED_SILENCE = 300.0
"""Seconds a resumed request stream waits for an event (as long as events are kept)."""
MAX_RESUMED_STREAMS = 32
"""Request streams one session may follow on one worker at a time (GETs resuming them with
``Last-Event-ID``). A client resumes each stream it lost once, so a session needs as many as it
had requests cut off; each GET holds a connection for up to :data:`RESUMED_SILENCE`, and a
client naming streams that never were (their ids are checked for shape only, since any worker
may have issued them) could otherwise hold any number."""
TOO_MANY_STREAMS = "Too many resumed streams open for this session"
SHUTTING_DOWN = "Server shutting down"
_WIRE_ID = re.compile(r"^([0-9a-f]{10})\.(\d{1,18})\.(-?\d{1,18})$")


class MCPEndpoint:
    """ASGI app serving one :class:`MCPServer` with full MCP sessions (see the module doc).

    ``json_response=True`` answers each request with one JSON body: simpler for some proxies,
    but a request's progress and log notifications are dropped and it cannot ask the client
    anything (no sampling or elicitation). ``resumable`` logs the events of SSE streams so a
    client resumes a lost stream on any worker. ``retry_ms`` is the reconnection delay suggested
    to clients in priming events. ``request_state_keys`` fixes the keys sealing session-less
    request state (else the backplane keeps a shared, rotated key); ``share_request_state=False``
    leaves the server's own request-state policy alone. A session's machinery stays warm for
    ``warm_seconds`` after the worker's last request of it ends, so a busy session reuses it;
    at most ``max_warm`` sessions are kept warm (a burst of new sessions keeps the newest).
    """

    def __init__(
        self,
        server: MCPServer,
        *,
        json_response: bool = False,
        resumable: bool = True,
        retry_ms: int | None = 1000,
        backplane: Backplane | None = None,
        request_state_keys: Sequence[bytes | str] | None = None,
        share_request_state: bool = True,
        warm_seconds: float = 5.0,
        max_warm: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.lowlevel = server._lowlevel_server
        spans_when_traced(self.lowlevel.middleware)
        self.initialize = InitializeAnswers(self.lowlevel)
        """Its sessions' ``initialize``, worked out once while the server stays the same."""
        self.json_response = json_response
        self.resumable = resumable
        self.retry_ms = retry_ms
        self.backplane: Backplane = backplane if backplane is not None else LocalBackplane()
        self._backplane_given = backplane is not None
        self.request_state = (
            SharedRequestState(server, keys=request_state_keys) if share_request_state else None
        )
        self.security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self.registry: SessionRegistry | None = None
        self.lifespan_state: Any = None
        self.live: dict[str, LiveSession] = {}
        self.warm_seconds = warm_seconds
        self.max_warm = max_warm
        self.clock = clock
        self._warm: OrderedDict[str, tuple[float, LiveSession]] = OrderedDict()
        """Machinery no request uses, kept until its deadline (oldest first)."""
        self._by_instance: dict[int, LiveSession] = {}
        self._instances = 0
        self._teardowns = 0
        self._streams: dict[str, set[anyio.CancelScope]] = {}
        """Every GET stream open here, by session: ended with the session."""
        self._standalone: dict[str, anyio.CancelScope] = {}
        """The standalone stream open here, by session (one per session, on every worker: each
        is also claimed through the relay)."""
        self._resumed: dict[str, dict[str, anyio.CancelScope]] = {}
        """The request streams resumed here, by session and stream: one GET each (a second
        resume of a stream ends the first, since no message goes on two streams)."""
        self._gets = 0
        self._closing = False
        """Set when the server stops (:meth:`end_streams`): a new GET stream would hold it."""
        self._tasks: anyio.abc.TaskGroup | None = None
        self._holds = HoldTimer(HOLD_SECONDS)
        """The requests' holds (see :class:`HoldTimer`), made anew on the loop of each start."""
        self._unsubscribe: Callable[[], None] | None = None
        self._logs_removed_with_sessions = False
        """The store deletes a removed session's event log itself (Redis, not a cluster)."""

    def bind_registry(self, registry: SessionRegistry) -> None:
        """Called by the middleware: session events tear machinery down, and a Redis store
        brings the Redis backplane (unless one was given)."""
        self.registry = registry
        self._logs_removed_with_sessions = False
        # A Redis store's module is loaded by whoever made the store; without one, redis (an
        # optional extra) may not be installed at all, so it is looked up, never imported here.
        redis_stores = sys.modules.get("mcp2anp_middleware.sessions.stores.redis")
        if (
            not self._backplane_given
            and redis_stores is not None
            and isinstance(registry.store, redis_stores.RedisSessionStore)
        ):
            from mcp2anp_middleware.mcp_hosting.redis_backplane import RedisBackplane

            store = registry.store
            self.backplane = RedisBackplane(store.client, prefix=store.prefix)
            # The script that removes a session deletes its event log too (not on a cluster).
            self._logs_removed_with_sessions = not store.cluster

    # -- service ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def service(self) -> AsyncIterator[None]:
        """Run the server's lifespan, the relay and the sessions' machinery while serving."""
        async with self.lowlevel.lifespan(self.lowlevel) as lifespan_state:
            self.lifespan_state = lifespan_state
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                self._closing = False
                self._holds = HoldTimer(HOLD_SECONDS)
                await self.backplane.relay.start(self._on_note, tasks)
                if self.request_state is not None:
                    await self.request_state.start(self.backplane, tasks)
                if self.registry is not None:
                    self._unsubscribe = self.registry.subscribe(self._on_session_event)
                if self.warm_seconds > 0:
                    tasks.start_soon(self._release_idle_loop)
                logger.info(
                    "MCP sessions served by worker %s (%s)",
                    self.backplane.relay.worker,
                    type(self.backplane).__name__,
                )
                try:
                    yield
                finally:
                    if self._unsubscribe is not None:
                        self._unsubscribe()
                    for live in list(self.live.values()):
                        self._forget(live)  # a restart in this process builds them anew
                        live.close()
                    tasks.cancel_scope.cancel()
                    self._tasks = None
                    with anyio.CancelScope(shield=True):
                        await self.backplane.relay.aclose()

    # -- requests --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get(HEADERS_SCOPE_KEY)  # (request_headers, inlined: the usual case)
        if type(headers) is not RequestHeaders or headers.source is not scope["headers"]:
            headers = request_headers(scope)
        if self._tasks is None:  # (either era: a 2026-07-28 state sealed now would not open)
            await send_jsonrpc_error(send, 503, INTERNAL_ERROR, "MCP endpoint is not running")
            return
        version = headers.version
        if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
            await handle_modern_request(
                self.lowlevel,
                self.security,
                self.json_response,
                self.lifespan_state,
                scope,
                receive,
                _jsonrpc_errors_only(send),
            )
            return
        method = scope["method"]
        if method not in ("GET", "POST"):
            await send_jsonrpc_error(
                send,
                405,
                INVALID_REQUEST,
                "Method Not Allowed",
                headers=[(b"allow", b"GET, POST, DELETE")],
            )
            return
        state: SessionState | None = scope.get("state", {}).get(SESSION_SCOPE_KEY)
        if state is None:
            await send_jsonrpc_error(send, 503, INTERNAL_ERROR, "MCP endpoint is not running")
            return
        if method == "POST":
            await self._post(state, scope, receive, send, headers)
        else:
            await self._get(state, scope, receive, send, headers)

    async def _post(
        self,
        state: SessionState,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: RequestHeaders,
    ) -> None:
        request = Request(scope, receive)  # the SDK hands it to handlers (ctx.request)
        accept = headers.accept or ""
        has_json, has_sse = (
            _accepted_cached(accept)
            if len(accept) <= _CACHED_HEADER_LENGTH
            else accepted_types(accept)
        )
        if not has_json:
            await send_jsonrpc_error(
                send, 406, INVALID_REQUEST, "Not Acceptable: client must accept application/json"
            )
            return
        content_type = headers.content_type or ""
        if not (
            _is_json_cached(content_type)
            if len(content_type) <= _CACHED_HEADER_LENGTH
            else _is_json_type(content_type)
        ):
            await send_jsonrpc_error(
                send,
                415,
                INVALID_REQUEST,
                "Unsupported Media Type: Content-Type must be application/json",
            )
            return
        parsed = scope.get(MESSAGE_SCOPE_KEY)  # the session middleware parsed it already
        try:
            if parsed is None:
                parsed = pydantic_core.from_json(await request.body())
        except ValueError:
            await send_jsonrpc_error(send, 400, PARSE_ERROR, "Parse error: body is not JSON")
            return
        try:
            message = _jsonrpc_message(parsed)
        except ValueError:  # pydantic's ValidationError included
            await send_jsonrpc_error(send, 400, INVALID_REQUEST, "Body is not a JSON-RPC message")
            return
        if state.closed:  # ended since the middleware found it (DELETE, eviction, another worker)
            request_id = message.id if isinstance(message, CheckedRequest) else None
            if state.reserved:  # its creating request (an initialize): the client has no id yet
                if self.registry is not None:
                    self.registry.stats.rejected["session_gone"] += 1
                await send_jsonrpc_error(
                    send,
                    503,
                    INTERNAL_ERROR,
                    SESSION_GONE,
                    request_id=request_id,
                    headers=[(b"retry-after", b"1")],
                )
                return
            text = "Session not found"
            await send_jsonrpc_error(send, 404, INVALID_REQUEST, text, request_id=request_id)
            return
        if not isinstance(message, CheckedRequest):  # (a request is the usual message)
            await _accepted(send)
            if isinstance(message, JSONRPCNotification):
                await self._notification(state, message)
            else:
                await self._answer(state.session_id, message)
            return
        sse = has_sse and not self.json_response
        # ``initialize`` is not resumable: its answer is held back until complete (it carries
        # the new session id), so no client could resume it midway.
        version = headers.version or "2025-03-26"
        resumable = (
            sse
            and self.resumable
            and message.method != "initialize"
            and version in _RESUMABLE_VERSIONS
        )
        live = self._acquire(state)
        try:
            await self._serve_request(live, message, request, send, sse=sse, resumable=resumable)
        finally:
            self._release(live)

    async def _serve_request(
        self,
        live: LiveSession,
        message: CheckedRequest,
        request: Request,
        send: Send,
        *,
        sse: bool,
        resumable: bool,
    ) -> None:
        """Run the request in this task, its events written as the server sends them."""
        stream = request_stream(message.id)
        if not sse:
            answers = _AnswerKeeper()
            if not live.begin(message, answers, resumable=False):
                await _in_flight_already(send, message)
                return
            watching = _CancelWhenGone(request, live, stream, self._holds)
            try:
                await live.serve(message, self._metadata(live, stream, request, None, sse=False))
            finally:
                watching.cancel()
                live.end(stream)
            if answers.answer is not None:
                await send_json(send, answers.answer.encode())
            else:
                await send_jsonrpc_error(send, 503, INTERNAL_ERROR, "Session ended")
            return
        writer = SSEWriter(send)
        if not live.begin(message, writer, resumable=resumable):
            await _in_flight_already(send, message)
            return
        watch: _CancelWhenGone | None = None
        try:
            priming: Event | None = None
            if resumable:  # an id to resume from before anything else; nothing is written
                cursor = self.backplane.events.anchor(live.session_id)
                priming = Event(stream, priming_id(cursor, live.resumable[stream]), None)
            # A resumable stream needs no watch for its client leaving: servers drop what is
            # sent after that, and every event is logged and published before it is written, so
            # the request goes on (in flight, its session kept) until it is answered. A stream
            # nobody can resume is watched: once its client is gone, the request is cancelled.
            # The watch starts when the hold is over, on the writer's timer.
            if not resumable:
                watch = _CancelWhenGone(request, live, stream)
            writer.begin_held(
                priming,
                retry_ms=self.retry_ms,
                hold=self._holds,
                on_hold_over=None if watch is None else watch.start,
            )
            await live.serve(message, self._metadata(live, stream, request, writer, sse=True))
        finally:
            if watch is not None:
                watch.cancel()
            live.end(stream)
            writer.stop_holding()
        if writer.open:  # (an answer sent alone closed it)
            await writer.finish()

    def _metadata(
        self,
        live: LiveSession,
        stream: str,
        request: Request,
        writer: SSEWriter | None,
        *,
        sse: bool,
    ) -> ServerMessageMetadata:
        closer: Callable[[], Awaitable[None]] | None = None
        standalone_closer: Callable[[], Awaitable[None]] | None = None
        if writer is not None and stream in live.resumable:

            async def close_stream() -> None:
                """SEP-1699 polling: end this response now; the request goes on, and the
                client resumes with ``Last-Event-ID`` (on any worker)."""
                live.detach(stream)
                await writer.finish()

            closer = close_stream
            standalone_closer = self.close_standalone_streams_callback(live.session_id)
        return ServerMessageMetadata(
            request_context=request,
            close_sse_stream=closer,
            close_standalone_sse_stream=standalone_closer,
            can_send_request=sse,
        )

    async def _get(
        self,
        state: SessionState,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: RequestHeaders,
    ) -> None:
        """The standalone stream, or a lost stream resumed from ``Last-Event-ID``."""
        request = Request(scope, receive)
        if not accepted_types(headers.accept or "")[1]:  # (a GET: rare enough, not cached)
            await send_jsonrpc_error(
                send, 406, INVALID_REQUEST, "Not Acceptable: client must accept text/event-stream"
            )
            return
        session_id = state.session_id
        last_event_id = headers.last_event_id
        if self._closing:  # (a keep-alive connection's GET while the server stops)
            await send_jsonrpc_error(send, 503, INTERNAL_ERROR, SHUTTING_DOWN)
            return
        if state.closed:  # ended since the middleware found it: no stream for a session gone
            await send_jsonrpc_error(send, 404, INVALID_REQUEST, "Session not found")
            return
        if last_event_id is not None and self._at_resume_cap(session_id, last_event_id):
            await send_jsonrpc_error(send, 429, SERVER_ERROR, TOO_MANY_STREAMS)
            return  # (before listening and reading the log: a refusal costs nothing)
        relay = self.backplane.relay
        self._gets += 1
        token = f"{relay.worker}.{self._gets}"
        # Whether this GET may hold the session's standalone stream on every worker: set before
        # a claim is sent (dropping a claim not held does nothing; a claim sent and cut short
        # must not be left to block the session's GETs until it lapses).
        claimed = False
        taken = True  # (False: a take-over the relay could not carry out, tried again later)
        if last_event_id is None:
            if session_id in self._standalone:
                await send_jsonrpc_error(send, 409, INVALID_REQUEST, CONFLICTING_STREAM)
                return
            claimed = True
            try:
                held = await relay.claim_standalone(session_id, token, take_over=False)
            except BaseException as exc:
                await self._release_claim(session_id, token)
                if not isinstance(exc, Exception):
                    raise
                logger.warning("Relay unavailable: a stream could not be opened")
                await _streams_unavailable(send)
                return
            # (meanwhile another GET may have taken it here, the session ended, or the server
            # began to stop: its streams were ended without this one)
            if not held or session_id in self._standalone or state.closed or self._closing:
                await self._release_claim(session_id, token)
                if state.closed:
                    await send_jsonrpc_error(send, 404, INVALID_REQUEST, "Session not found")
                elif self._closing:
                    await send_jsonrpc_error(send, 503, INTERNAL_ERROR, SHUTTING_DOWN)
                else:
                    await send_jsonrpc_error(send, 409, INVALID_REQUEST, CONFLICTING_STREAM)
                return
        cancel = anyio.CancelScope()
        resumed: str | None = None  # the request stream this GET follows, once found
        if last_event_id is None:
            self._standalone[session_id] = cancel
        self._streams.setdefault(session_id, set()).add(cancel)
        writer = SSEWriter(send)
        refused = False
        try:
            with cancel:
                try:
                    listening = self.backplane.relay.listen(session_id)
                    live_events = await listening.__aenter__()
                except Exception:
                    logger.warning("Relay unavailable: a stream could not be opened")
                    refused = True  # (before it is sent: a second response must not follow)
                    await _streams_unavailable(send)
                    return
                try:
                    stream = STANDALONE
                    seen: set[str] = set()
                    if last_event_id is None and not await self._keep_claim(session_id, token):
                        # Taken over before this worker listened to hear of it: the
                        # resuming GET holds the stream.
                        refused = True
                        await send_jsonrpc_error(send, 409, INVALID_REQUEST, CONFLICTING_STREAM)
                        return
                    if last_event_id is not None:
                        found = await self._replay(session_id, last_event_id)
                        if found is not None and found[0] == STANDALONE:
                            # The standalone stream, reconnected: the session's one from now
                            # on (the earlier one's client left, or will receive nothing more:
                            # no message goes on two streams), here and on the other workers.
                            earlier = self._standalone.get(session_id)
                            if earlier is not None:
                                earlier.cancel()
                            self._standalone[session_id] = cancel
                            claimed = True
                            taken = await self._take_over(session_id, token)
                        elif found is not None:
                            resumed = found[0]
                            if not self._follows(session_id, resumed, cancel):
                                refused = True
                                await send_jsonrpc_error(send, 429, SERVER_ERROR, TOO_MANY_STREAMS)
                                return
                        await writer.start([])
                        if found is None:
                            return
                        stream, replayed = found
                        for event in replayed:
                            if event.event_id is not None:
                                seen.add(event.event_id)
                            if event.payload is not None:
                                await writer.event(wire_event(event))
                            if event.final:
                                return
                    else:
                        await writer.start([])
                        if self.resumable:  # an id the client can resume (take over) from
                            cursor = self.backplane.events.anchor(session_id)
                            primed = Event(STANDALONE, priming_id(cursor, STANDALONE), None)
                            await writer.event(primed)
                    owner = (session_id, token) if claimed else None
                    await self._follow(
                        request,
                        writer,
                        live_events,
                        stream,
                        seen,
                        owner,
                        take_over=not taken,
                        # (a request's stream ends with its answer: never cut off)
                        aged=self._aged_check(state) if stream == STANDALONE else None,
                    )
                finally:
                    with anyio.CancelScope(shield=True):
                        await listening.__aexit__(None, None, None)
        finally:
            if self._standalone.get(session_id) is cancel:
                del self._standalone[session_id]
            if resumed is not None:
                self._unfollow(session_id, resumed, cancel)
            scopes = self._streams.get(session_id)
            if scopes is not None:
                scopes.discard(cancel)
                if not scopes:
                    del self._streams[session_id]
            if claimed:  # before the client sees the end: it may reconnect at once, anywhere
                await self._release_claim(session_id, token)
            if not writer.started and not refused:  # ended before the stream began
                with anyio.CancelScope(shield=True):
                    if self._closing:  # (by the server's stop, not the session's end)
                        await send_jsonrpc_error(send, 503, INTERNAL_ERROR, SHUTTING_DOWN)
                    else:
                        await send_jsonrpc_error(send, 404, INVALID_REQUEST, "Session not found")
            await writer.finish()

    def _at_resume_cap(self, session_id: str, last_event_id: str) -> bool:
        """Whether a resume of the request stream ``last_event_id`` names (every id this
        server sends names its stream) would be one more than the session may follow here."""
        primed = parse_priming_id(last_event_id)
        if primed is None or primed[1] == STANDALONE:
            return False
        following = self._resumed.get(session_id, {})
        return len(following) >= MAX_RESUMED_STREAMS and primed[1] not in following

    def _follows(self, session_id: str, stream: str, cancel: anyio.CancelScope) -> bool:
        """Make ``cancel``'s GET the one following ``stream`` here (ending an earlier GET of the
        same stream); False when the session follows :data:`MAX_RESUMED_STREAMS` others."""
        following = self._resumed.get(session_id, {})
        earlier = following.get(stream)
        if earlier is not None:
            earlier.cancel()  # its client left, or gets nothing more: the later GET has it
        elif len(following) >= MAX_RESUMED_STREAMS:
            return False
        self._resumed.setdefault(session_id, following)[stream] = cancel
        return True

    def _unfollow(self, session_id: str, stream: str, cancel: anyio.CancelScope) -> None:
        following = self._resumed.get(session_id)
        if following is not None and following.get(stream) is cancel:
            del following[stream]
            if not following:
                del self._resumed[session_id]

    def _aged_check(self, state: SessionState) -> Callable[[], bool] | None:
        """Whether ``state`` is past its maximum age now (None: sessions have none)."""
        registry = self.registry
        if registry is None or registry.max_session_age is None:
            return None
        ends_at = state.created_at + registry.max_session_age
        clock = registry.clock
        return lambda: clock() > ends_at

    async def _take_over(self, session_id: str, token: str) -> bool:
        """Claim the session's standalone stream for ``token`` from whichever GET holds it, on
        any worker (it ends). Without the relay, False: the stream is served here, and tries
        again at each renewal until the relay is back."""
        try:
            await self.backplane.relay.claim_standalone(session_id, token, take_over=True)
        except Exception:
            logger.warning("Relay unavailable: a resumed stream could not claim the session")
            return False
        return True

    async def _release_claim(self, session_id: str, token: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.backplane.relay.release_standalone(session_id, token)
            except Exception:  # it lapses by itself (CLAIM_SECONDS)
                logger.debug("Relay unavailable: a standalone stream's claim was left to lapse")

    async def _follow(
        self,
        request: Request,
        writer: SSEWriter,
        live_events: Any,
        stream: str,
        seen: set[str],
        owner: tuple[str, str] | None = None,
        *,
        take_over: bool = False,
        aged: Callable[[], bool] | None = None,
    ) -> None:
        """Write the stream's live events until it ends. ``owner`` (session id, token): this is
        the session's claimed standalone stream, renewed while open, and ended when another
        GET takes it over; with ``take_over`` its own take-over failed (the relay was away),
        and is tried again instead of each renewal until it succeeds. ``aged`` says when the
        session is past its maximum age: the stream then ends (an open stream holds its session
        as a running request does, and would otherwise outlive that limit for good), and its
        session with it."""
        async with anyio.create_task_group() as tasks:

            async def watch_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch_disconnect)
            # A resumed request stream that gets no event of its own for longer than events
            # are kept (its request ended unseen, say) ends, however busy the rest of its
            # session; the client may resume again. The standalone stream lasts as long as its
            # client, its claim, and its session's maximum age.
            silent_since = anyio.current_time()
            renew_at = silent_since + KEEPALIVE_SECONDS
            while writer.open:
                now = anyio.current_time()
                if now >= renew_at:  # every 15 to 30 s
                    renew_at = now + KEEPALIVE_SECONDS
                    if stream != STANDALONE and now - silent_since > RESUMED_SILENCE:
                        break
                    if aged is not None and aged():
                        break  # past its maximum age: the session goes with its last stream
                    if owner is None:
                        pass
                    elif take_over:
                        take_over = not await self._take_over(*owner)
                    elif not await self._keep_claim(*owner):
                        break  # another GET holds the session's standalone stream now
                with anyio.move_on_after(KEEPALIVE_SECONDS) as idle:
                    try:
                        event: Event = await live_events.receive()
                    except (anyio.EndOfStream, anyio.ClosedResourceError):
                        break  # fell too far behind: the client resumes from the log
                if idle.cancelled_caught:
                    await writer.keepalive()
                    continue
                if event.stream != stream or (
                    event.event_id is not None and event.event_id in seen
                ):
                    if (
                        owner is not None
                        and event.stream == OWNER_STREAM
                        and event.payload != owner[1]
                        and not await self._keep_claim(*owner, again=False)  # (a late notice?)
                    ):
                        break  # taken over by a GET that resumed it (here or elsewhere)
                    continue
                silent_since = anyio.current_time()
                await writer.event(wire_event(event))
                if event.final:
                    break
            tasks.cancel_scope.cancel()

    async def _keep_claim(self, session_id: str, token: str, *, again: bool = True) -> bool:
        """Renew this GET's claim on the session's standalone stream (taken again if it lapsed,
        with ``again``); False when another GET holds it (or, without ``again``, none does)."""
        try:
            return await self.backplane.relay.keep_standalone(session_id, token, again=again)
        except Exception:  # the relay is away: keep serving (the claim may lapse meanwhile)
            logger.debug("Relay unavailable: a standalone stream's claim was not renewed")
            return True

    async def _replay(self, session_id: str, last_event_id: str) -> tuple[str, list[Event]] | None:
        try:
            return await self.backplane.events.after(session_id, last_event_id)
        except Exception:
            logger.warning("Event log unavailable: a stream could not be resumed")
            return None

    # -- messages between the client, the workers and the machinery ------------------------------

    async def _answer(self, session_id: str, message: JSONRPCResponse | JSONRPCError) -> None:
        """A client's answer to a server→client request: to the machinery waiting for it."""
        match = _WIRE_ID.match(str(message.id))
        if match is None:
            logger.debug("Answer to an unknown request dropped")
            return
        worker, instance, local = match.group(1), int(match.group(2)), int(match.group(3))
        note: Note = {
            "s": session_id,
            "k": "answer",
            "i": instance,
            "m": message.model_copy(update={"id": local}).model_dump(
                mode="json", by_alias=True, exclude_unset=True
            ),
        }
        if worker == self.backplane.relay.worker:
            await self._on_note(note)
            return
        try:
            await self.backplane.relay.to_worker(worker, note)
        except Exception:
            logger.warning("Relay unavailable: an answer for another worker was not delivered")

    async def _notification(self, state: SessionState, message: JSONRPCNotification) -> None:
        if message.method == "notifications/cancelled":
            note: Note = {
                "s": state.session_id,
                "k": "cancel",
                "m": message.model_dump(mode="json", by_alias=True, exclude_unset=True),
            }
            live = self.live.get(state.session_id)
            if live is not None:
                await live.notification(message)
            try:
                await self.backplane.relay.to_all(note)
            except Exception:
                logger.warning("Relay unavailable: a cancellation reached this worker only")
            return
        live = self._acquire(state)
        try:
            await live.notification(message)
        finally:
            self._release(live)

    async def _on_note(self, note: Note) -> None:
        session_id = note.get("s")
        kind = note.get("k")
        try:
            if kind == "answer":
                live = self._by_instance.get(int(note["i"]))
                if live is None or live.session_id != session_id:
                    logger.debug("Answer for machinery that has ended dropped")
                    return
                answer = _jsonrpc_message(note["m"])
                if isinstance(answer, JSONRPCResponse | JSONRPCError) and answer.id is not None:
                    live.answered(int(answer.id), answer)
            elif kind == "cancel" and isinstance(session_id, str):
                live = self.live.get(session_id)
                if live is not None:  # off the relay's reader: a slow handler stalls nothing
                    cancel = JSONRPCNotification.model_validate(note["m"], by_name=False)
                    self.spawn(live.notification, cancel)
            elif kind == "close_standalone" and isinstance(session_id, str):
                self._close_standalone(session_id)
        except (KeyError, ValueError, TypeError, ValidationError):
            logger.warning("Malformed note between workers dropped")

    # -- the machinery's lifecycle ---------------------------------------------------------------

    def _acquire(self, state: SessionState) -> LiveSession:
        """The session's machinery on this worker (warm, or built now). For a session that ended
        meanwhile it is built closed, so its request is answered and nothing is kept."""
        live = self.live.get(state.session_id)
        if live is None or live.ended or live.state is not state:
            self._instances += 1
            live = LiveSession(self, state, self._instances)
            if state.closed:
                live.close()
            else:
                self.live[state.session_id] = live
                self._by_instance[live.instance] = live
        else:
            self._warm.pop(state.session_id, None)
            live.refresh()
        live.users += 1
        return live

    @property
    def running(self) -> int:
        """Sessions with a request running on this worker, and machinery still being torn down."""
        return self._teardowns + sum(1 for live in self.live.values() if not live.finished)

    def spawn(self, function: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``function`` in the background (the teardown of ended machinery)."""
        if self._tasks is None:
            return
        self._teardowns += 1

        async def counted() -> None:
            try:
                await function(*args)
            finally:
                self._teardowns -= 1

        self._tasks.start_soon(counted)

    def _release(self, live: LiveSession) -> None:
        """The worker's last request or stream of the session ended: keep the machinery warm
        for ``warm_seconds`` (the next request of a busy session reuses it), then close it."""
        live.users -= 1
        if live.users or not live.finished:
            return
        if self.warm_seconds > 0 and self.max_warm > 0 and not live.ended:
            self._warm[live.session_id] = (self.clock() + self.warm_seconds, live)
            self._warm.move_to_end(live.session_id)
            if len(self._warm) > self.max_warm:  # a burst of new sessions: keep the newest warm
                _, (_, oldest) = self._warm.popitem(last=False)
                self._forget(oldest)
                oldest.close()
        else:
            self._forget(live)
            live.close()

    def release_idle(self, now: float | None = None) -> int:
        """Close the warm machinery of sessions unused since ``warm_seconds`` before ``now``
        (all of it with ``now=math.inf``); returns how many were closed. Run every second."""
        now = self.clock() if now is None else now
        closed = 0
        while self._warm:
            session_id, (deadline, live) = next(iter(self._warm.items()))
            if deadline > now:
                break
            del self._warm[session_id]
            self._forget(live)
            live.close()
            closed += 1
        return closed

    async def _release_idle_loop(self) -> None:
        while True:
            await anyio.sleep(min(1.0, self.warm_seconds / 2))
            self.release_idle()

    def _forget(self, live: LiveSession) -> None:
        if self.live.get(live.session_id) is live:
            del self.live[live.session_id]
        self._by_instance.pop(live.instance, None)
        warm = self._warm.get(live.session_id)
        if warm is not None and warm[1] is live:
            del self._warm[live.session_id]

    def _on_session_event(self, event: SessionEvent) -> None:
        if not event.kind.ends_session:
            return
        live = self.live.get(event.session_id)
        idle = live is None or live.finished  # nothing of it runs here now
        if live is not None:
            self._forget(live)
            live.close()
        streams = list(self._streams.get(event.session_id, ()))
        for cancel in streams:
            cancel.cancel()
        if event.kind is SessionEventKind.CLOSED:  # only this worker let go of it: the log stays
            return
        if (
            self._logs_removed_with_sessions
            and event.kind in (SessionEventKind.DELETED, SessionEventKind.REVOKED)
            and idle
            and not streams
        ):
            # The script that removed the session deleted its log, and nothing running here
            # can log after it (a request or stream running here may have: then it is dropped).
            return
        drop_now = getattr(self.backplane.events, "drop_now", None)
        if drop_now is not None:  # in memory: no task for it
            drop_now(event.session_id)
        elif self._tasks is not None:
            self._tasks.start_soon(self._drop_events, event.session_id)

    async def _drop_events(self, session_id: str) -> None:
        try:
            await self.backplane.events.drop(session_id)
        except Exception:
            logger.debug("Event log of an ended session not dropped (it expires by itself)")

    def end_streams(self) -> None:
        """End every GET stream open here (shutting down: clients reconnect to another worker),
        and answer later GETs 503 until the next start; requests in flight are left to finish."""
        self._closing = True
        for scopes in self._streams.values():
            for cancel in scopes:
                cancel.cancel()

    def close_standalone_streams_callback(self, session_id: str) -> Callable[[], Awaitable[None]]:
        """``ctx.close_standalone_sse_stream()`` (SEP-1699 polling): the session's standalone
        stream ends on whichever worker holds it."""

        async def close_standalone() -> None:
            self._close_standalone(session_id)
            try:
                await self.backplane.relay.to_all({"s": session_id, "k": "close_standalone"})
            except Exception:
                logger.warning(
                    "Relay unavailable: a standalone stream was closed on this worker only"
                )

        return close_standalone

    def _close_standalone(self, session_id: str) -> None:
        cancel = self._standalone.get(session_id)
        if cancel is not None:
            cancel.cancel()

    # -- the backplane, failures contained -------------------------------------------------------

    async def record(self, session_id: str, event: Event) -> Event:
        """Log and publish ``event`` (see :meth:`Backplane.record`); without a backplane it
        goes out without an id, and cannot be resumed."""
        try:
            return await self.backplane.record(session_id, event)
        except Exception:
            logger.warning("Event log unavailable: an event was sent without an id")
            return event

    async def publish(self, session_id: str, event: Event) -> None:
        try:
            await self.backplane.relay.publish(session_id, event)
        except Exception:
            logger.warning("Relay unavailable: an event for another worker was not delivered")

    async def save_handshake(self, state: SessionState, handshake: Handshake) -> None:
        text = handshake.encode()
        if self.registry is None:
            state.handshake = text
            return
        try:
            await self.registry.save_handshake(state, text)
        except Exception:
            logger.warning("Session store unavailable: the handshake is kept in this process only")


class _AnswerKeeper:
    """The writer of a JSON response: it keeps the answer (a JSON body carries nothing else)."""

    unseen = True

    def __init__(self) -> None:
        self.answer: str | None = None

    async def write(self, event: Event) -> None:
        if event.final and event.payload is not None:
            self.answer = event.payload


async def _streams_unavailable(send: Send) -> None:
    """A GET stream could not be opened: the relay (Redis) is away."""
    await send_jsonrpc_error(
        send,
        503,
        INTERNAL_ERROR,
        "Streams are unavailable; retry shortly",
        headers=[(b"retry-after", b"2")],
    )


async def _in_flight_already(send: Send, message: CheckedRequest) -> None:
    await send_jsonrpc_error(
        send,
        409,
        INVALID_REQUEST,
        "A request with this id is already in flight in this session",
        request_id=message.id,
    )


async def _accepted(send: Send) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _jsonrpc_errors_only(send: Send) -> Send:
    """Rewrites the SDK's few non-JSON error answers (empty 405/406) so every refusal a client
    sees carries a JSON-RPC error body."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = Headers(raw=message.get("headers", []))
            if message["status"] >= 400 and not headers.get("content-type", "").startswith(
                "application/json"
            ):
                held = message
                return
        elif held is not None and message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = held["status"]
            text = b"".join(chunks).decode("utf-8", "replace").strip()[:200]
            keep = [
                (name, value)
                for name, value in held.get("headers", [])
                if name.lower() in (b"allow", b"retry-after")
            ]
            held = None
            await send_jsonrpc_error(
                send, status, INVALID_REQUEST, text or HTTPStatus(status).phrase, headers=keep
            )
            return
        await send(message)

    return sending


class _CancelWhenGone:
    """Watch a request whose answer nobody could fetch again (a JSON answer, or an SSE stream
    without event ids): when its client disconnects, cancel the request, so a tool waiting for
    the client (sampling, elicitation) or a slow agent stops holding the session in flight.

    The watch starts only once the request has run for ``HOLD_SECONDS``: most requests are
    answered sooner, and a watch costs a task. Started right before the request runs, so the
    request is registered before the watch first runs. The watch first reads the body into
    ``request`` (a handler asking for it later gets it from there), then what follows."""

    def __init__(
        self, request: Request, live: LiveSession, stream: str, holds: HoldTimer | None = None
    ) -> None:
        """Without ``holds`` the caller calls :meth:`start` (an SSE writer's hold)."""
        self._request = request
        self._live = live
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        self._over = False
        self._hold = None if holds is None else holds.hold(self.start)

    def start(self) -> None:
        if self._task is None and not self._over:
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        request = self._request
        try:
            await request.body()
        except ClientDisconnect:
            self._live.cancel(self._stream)
            return
        except RuntimeError:  # a handler read the body as a stream: it is gone, not the client
            pass
        while True:
            try:
                message = await request.receive()
            except Exception:  # servers differ in how they say the client is gone
                break
            if message["type"] == "http.disconnect":
                break
        self._live.cancel(self._stream)

    def cancel(self) -> None:
        self._over = True
        if self._hold is not None:
            self._hold.cancel()
        if self._task is not None:
            self._task.cancel()


_CACHED_HEADER_LENGTH = 256
"""Header values longer than this are worked out each time, never cached (a client could
otherwise make a cache hold 64 of the longest headers the server accepts)."""


def accepted_types(accept: str) -> tuple[bool, bool]:
    """Whether an ``Accept`` header takes JSON and SSE, wildcards included (RFC 9110 12.5.1),
    as the SDK's transport decides."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    anything = "*/*" in types
    return (
        anything or "application/json" in types or "application/*" in types,
        anything or "text/event-stream" in types or "text/*" in types,
    )


def _is_json_type(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON (parameters ignored)."""
    return content_type.split(";")[0].strip().lower() == "application/json"


# A client sends the same headers with every request: the two checks are cached for values up to
# _CACHED_HEADER_LENGTH, and called through the cache directly (a wrapper choosing between the
# two would be a Python call more per request).
_accepted_cached = lru_cache(maxsize=64)(accepted_types)
_is_json_cached = lru_cache(maxsize=64)(_is_json_type)


class CheckedRequest(NamedTuple):
    """A JSON-RPC request from the client, checked as ``JSONRPCRequest`` checks it (the SDK
    validates its ``params`` against the method's own model when it serves it)."""

    id: RequestId
    method: str
    params: dict[str, Any] | None


def _jsonrpc_message(
    parsed: Any,
) -> CheckedRequest | JSONRPCNotification | JSONRPCResponse | JSONRPCError:
    """Validate one JSON-RPC message against the one model its members name, rather than
    against the union of all four (which tries each in turn). ValueError if it is none.

    A request of the usual shape (version "2.0", an integer or string id, a string method,
    object params or none) is checked here: those are the only checks ``JSONRPCRequest``
    makes of it, it ignores other members as well, and a request is the one message every
    call sends. Anything else goes to the models, whose errors are the ones clients see. The
    models' own validators are called directly: ``model_validate`` only forwards to them, and
    its checks of its arguments cost more than the validation of a small message."""
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON-RPC message")
    if "method" in parsed:
        if "id" in parsed:
            request_id = parsed["id"]
            method = parsed["method"]
            params = parsed.get("params")
            if (
                (type(request_id) is int or type(request_id) is str)
                and type(method) is str
                and (params is None or type(params) is dict)
                and parsed.get("jsonrpc") == "2.0"
            ):
                return CheckedRequest(request_id, method, params)
            request = JSONRPCRequest.__pydantic_validator__.validate_python(parsed, by_name=False)
            return CheckedRequest(request.id, request.method, request.params)
        model: Any = JSONRPCNotification
    else:
        model = JSONRPCError if "error" in parsed else JSONRPCResponse
    message: JSONRPCNotification | JSONRPCResponse | JSONRPCError
    message = model.__pydantic_validator__.validate_python(parsed, by_name=False)
    return message
