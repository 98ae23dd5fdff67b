"""One session's SDK machinery in this worker, alive while a request or stream of it is open here.

This is what the SDK's stateful mode keeps per session (a :class:`~mcp.server.connection.
Connection` with its handshake, and the SDK's own per-connection kernel,
:class:`~mcp.server.runner.ServerRunner`), rebuilt on any worker from the session's record. Each
request runs in the task of its own HTTP request: the kernel is called directly with a dispatch
context of this module (no read and write streams, no task per request), and whatever the server
sends goes straight to the request's response stream. The differences from the SDK's transport
are the ones that let a session span workers:

- the connection is born initialized from the stored :class:`Handshake` (``initialize`` may have
  been served by another worker);
- a request sent to the client gets an id naming this worker and this machinery
  (``worker.instance.n``), so the client's answer, on whatever worker it lands, is relayed here;
- every message of a resumable stream (and of the standalone GET stream) is logged and published
  before it is written, so a client that lost its stream resumes it on any worker.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from mcp.server.connection import Connection
from mcp.server.runner import ServerRunner, aclose_shielded
from mcp.shared.dispatcher import CallOptions
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.jsonrpc_dispatcher import (
    cancelled_request_id_from_params,
    handler_exception_to_error_data,
    progress_token_from_params,
)
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PROTOCOL_VERSION_META_KEY,
    REQUEST_TIMEOUT,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from pydantic import TypeAdapter

from mcp2anp_middleware.cancel_scope import cancel_scope
from mcp2anp_middleware.logging_setup import traceback_text
from mcp2anp_middleware.mcp_hosting.backplane import STANDALONE as STANDALONE
from mcp2anp_middleware.mcp_hosting.backplane import Event, priming_id, wire_event
from mcp2anp_middleware.mcp_hosting.handshake import Handshake, below_level, decoded
from mcp2anp_middleware.sessions.state import SessionState

if TYPE_CHECKING:
    from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint

logger = logging.getLogger("mcp2anp_middleware.mcp_hosting")


def request_stream(request_id: RequestId) -> str:
    """The key of a request's stream: never :data:`STANDALONE`, whatever string id a client
    sends (``"_GET_stream"`` is one). An id and its text (``1``, ``"1"``) share one, as in the
    SDK's transport."""
    return f"#{request_id}"


REQUEST_CANCELLED = -32800
"""The 2025-era wire ends a request's stream only with a response; a cancelled request gets this."""


class ClientRequest(Protocol):
    """A request from the client, as this machinery reads it: a ``JSONRPCRequest``, or the
    endpoint's :class:`~mcp2anp_middleware.mcp_hosting.endpoint.CheckedRequest`."""

    @property
    def id(self) -> RequestId: ...

    @property
    def method(self) -> str: ...

    @property
    def params(self) -> dict[str, Any] | None: ...


class Writer(Protocol):
    """Where a request's events go on this worker: its HTTP response."""

    async def write(self, event: Event) -> None: ...

    @property
    def unseen(self) -> bool:
        """Nothing was sent yet: an answer now is the whole response, and nobody can resume
        it (so it need not be logged)."""
        ...


class RequestChannel:
    """The SDK's dispatch context for one request: what a handler sends goes to the request's
    own stream; a request to the client waits for its answer here."""

    # One is made for every request: what starts the same for all is a class attribute.
    closed = False
    cancelled_by_client = False
    _cancel_event: anyio.Event | None = None

    def __init__(
        self,
        live: LiveSession,
        request_id: RequestId | None,
        message_metadata: ServerMessageMetadata | None,
        transport: TransportContext,
        progress_token: str | int | None = None,
    ) -> None:
        self.live = live
        self.request_id = request_id
        self.message_metadata = message_metadata
        self.transport = transport
        self.progress_token = progress_token

    @property
    def cancel_requested(self) -> anyio.Event:
        """Set when the client cancels the request; made on first use (few handlers ask)."""
        if self._cancel_event is None:
            self._cancel_event = anyio.Event()
            if self.cancelled_by_client:
                self._cancel_event.set()
        return self._cancel_event

    def request_cancel(self) -> None:
        self.cancelled_by_client = True
        if self._cancel_event is not None:
            self._cancel_event.set()

    @property
    def can_send_request(self) -> bool:
        return self.transport.can_send_request and not self.closed

    async def notify(
        self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None
    ) -> None:
        if self.closed:
            return
        message = JSONRPCNotification(jsonrpc="2.0", method=method, params=_plain(params))
        await self.live.send_out(message, self._stream())

    async def send_raw_request(
        self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None
    ) -> dict[str, Any]:
        if not self.can_send_request:
            raise NoBackChannelError(method)
        return await self.live.ask_client(method, params, opts, self._stream())

    async def progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        if self.progress_token is None:
            return
        params: dict[str, Any] = {"progressToken": self.progress_token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self.notify("notifications/progress", params)

    def _stream(self) -> str:
        return STANDALONE if self.request_id is None else request_stream(self.request_id)


class _Answer:
    """A request sent to the client, waiting for its answer (from any worker)."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.outcome: dict[str, Any] | ErrorData = ErrorData(
            code=CONNECTION_CLOSED, message="Session closed"
        )


class LiveSession:
    def __init__(self, endpoint: MCPEndpoint, state: SessionState, instance: int) -> None:
        self.endpoint = endpoint
        self.state = state
        self.session_id = state.session_id
        self.instance = instance
        self.users = 0
        self.writers: dict[str, Writer] = {}
        """Response streams open on this worker, by stream (the request id as text)."""
        self.running: dict[str, tuple[anyio.CancelScope, RequestChannel]] = {}
        """Requests running here, by stream."""
        self.resumable: dict[str, str] = {}
        """Resumable streams open here, and the name each one's events are logged under (unique
        to the request, never client text: it goes into event ids)."""
        self._asked: dict[int, _Answer] = {}
        self._emitting: dict[str, int] = {}
        """Streams with an event being logged and written now (how many)."""
        self._next_id = 0
        self._handshake_text = state.handshake
        self.handshake = decoded(state.handshake) if state.handshake else None
        self.connection = self._connection()
        self.runner = ServerRunner(endpoint.lowlevel, self.connection, endpoint.lifespan_state)
        _fill_cached_callbacks(self.runner)
        self.ended = False
        """Closed: requests that still come are answered 'Session ended', nothing is kept."""

    def _connection(self) -> Connection:
        """Born initialized from the stored handshake; a handshake that no longer validates
        leaves it uninitialized, and the SDK's own gate refuses the session's requests."""
        if self.handshake is not None:
            try:
                return self.handshake.connection(self, self.session_id)
            except ValueError:  # pydantic's ValidationError included
                logger.warning("Stored MCP handshake unusable; serving the session uninitialized")
        return Connection.for_loop(self, session_id=self.session_id)

    @property
    def finished(self) -> bool:
        """Nothing runs here (no request, no request sent to the client awaits its answer)."""
        return not self.running and not self._asked

    def refresh(self) -> None:
        """Reused for a new request: pick up a handshake change (a log level set through another
        worker reaches this one with the session's record)."""
        text = self.state.handshake
        if text is not None and (self.handshake is None or text != self._handshake_text):
            self.handshake = decoded(text)
            self._handshake_text = text

    def close(self) -> None:
        """End the machinery: requests still running are cancelled, open streams end."""
        if self.ended:
            return
        self.ended = True
        for scope, channel in self.running.values():
            channel.closed = True
            scope.cancel()
        for answer in self._asked.values():
            answer.event.set()
        # The SDK's per-connection teardown, when a handler registered any (most leave the
        # stack empty; unwinding an empty one would still arm a 5 s shielded timer).
        if getattr(self.connection.exit_stack, "_exit_callbacks", True):
            self.endpoint.spawn(aclose_shielded, self.connection)
        self._unlink_if_done()

    def _unlink_if_done(self) -> None:
        """Once closed with nothing left running, let go of the SDK's objects.

        The connection holds this object (its outbound channel) and this object holds the
        connection and its kernel, whose cached callbacks hold the kernel itself: cycles, which
        only the garbage collector frees, and by then they have usually aged into its oldest
        generation, so a dropped session's machinery (and its record) stayed in memory until a
        full collection. Cut here, they are freed when the last reference goes. A handler that
        kept its context past its request can still send through this object (to the
        session's GET stream), as before."""
        if not self.ended or not self.finished or not hasattr(self, "runner"):
            return
        for callback in _RUNNER_CALLBACKS:  # functools.cached_property values
            self.runner.__dict__.pop(callback, None)
        del self.runner
        del self.connection

    # -- requests from the client ----------------------------------------------------------------

    def begin(self, request: ClientRequest, writer: Writer, *, resumable: bool) -> bool:
        """Register the response stream of ``request``; False if its id is already in flight."""
        stream = request_stream(request.id)
        if stream in self.running or stream in self.writers:
            return False
        self.writers[stream] = writer
        if resumable:
            self._next_id += 1
            self.resumable[stream] = (
                f"{self.endpoint.backplane.relay.worker}.{self.instance}.{self._next_id}"
            )
        return True

    async def serve(self, request: ClientRequest, metadata: ServerMessageMetadata) -> None:
        """Run ``request`` through the SDK's kernel in this task; its answer (or, if it was
        cancelled, error -32800, since this era's wire ends a stream only with an answer) is
        the last event of its stream."""
        stream = request_stream(request.id)
        if self.ended:  # the session ended before this request got here
            ended = ErrorData(code=CONNECTION_CLOSED, message="Session ended")
            await self._emit(_error_json(request.id, ended), stream, True)
            return
        params = request.params
        # Most requests carry no _meta: both of its readers below are skipped without it.
        meta = params.get("_meta") if params else None
        channel = RequestChannel(
            self,
            request.id,
            metadata,
            _TRANSPORTS[metadata.can_send_request],
            None if meta is None else progress_token_from_params(params),
        )
        scope = cancel_scope()
        self.running[stream] = (scope, channel)
        answer: str | None = None
        try:
            with scope:
                try:
                    if meta is not None and request.method != "initialize" and _enveloped(params):
                        raise MCPError(
                            code=INVALID_REQUEST,
                            message="This session serves the handshake protocol era; requests "
                            "carrying the 2026-07-28 envelope are not accepted in it",
                        )
                    if request.method == "initialize":  # (worked out once, not per session)
                        result = await self.endpoint.initialize.run(
                            self.runner, channel, request.params
                        )
                    else:
                        result = await self.runner.on_request(
                            channel, request.method, request.params
                        )
                except Exception as exc:
                    error = handler_exception_to_error_data(exc)
                    if error is None:
                        logger.error("Handler for %r raised\n%s", request.method, traceback_text())
                        error = ErrorData(code=0, message=str(exc))
                    answer = _error_json(request.id, error)
                else:
                    # The result is the SDK's wire form already: framed as is, no model between.
                    try:
                        answer = _answer_json(request.id, result)
                    except ValueError:  # pydantic's serialization errors included
                        text = "Result of %r could not be serialized\n%s"
                        logger.error(text, request.method, traceback_text())
                        failed = ErrorData(code=INTERNAL_ERROR, message="Internal error")
                        answer = _error_json(request.id, failed)
                    else:
                        if request.method in _HANDSHAKE_CHANGES:
                            if self.state.reserved:  # kept with its commit: nothing to write
                                await self._after_success(request)
                            else:
                                with cancel_scope(shield=True):  # committed: kept with it
                                    await self._after_success(request)
        except BaseException:
            self.running.pop(stream, None)
            self._unlink_if_done()
            raise
        finally:
            channel.closed = True
        if self.ended and answer is None:
            ended = ErrorData(code=CONNECTION_CLOSED, message="Session ended")
            answer = _error_json(request.id, ended)
        elif answer is None or channel.cancelled_by_client:
            cancelled = ErrorData(code=REQUEST_CANCELLED, message="Request cancelled")
            answer = _error_json(request.id, cancelled)
        try:
            await self._emit(answer, stream, True)  # (an answer is never counted as on its way)
        finally:
            # In flight until its answer is out: a logged answer reaches a polling client
            # through the log's relay before its write here returns, and a request reusing the
            # id meanwhile is refused (409), not handed this answer while its own is dropped.
            self.running.pop(stream, None)
            self._unlink_if_done()

    async def notification(self, message: JSONRPCNotification) -> None:
        """A client notification: a cancellation stops the request it names (if it runs here);
        every notification then goes to the server's own handlers."""
        if message.method == "notifications/cancelled":
            target = cancelled_request_id_from_params(message.params)
            if target is not None:
                self.cancel(request_stream(target))
        if self.ended:  # nothing of the session is served any more
            return
        channel = RequestChannel(self, None, None, _TRANSPORTS[False])
        await self.runner.on_notify(channel, message.method, message.params)

    def cancel(self, stream: str) -> None:
        """Cancel the request of ``stream`` if it runs here (answered -32800)."""
        running = self.running.get(stream)
        if running is not None:
            running[1].request_cancel()
            running[0].cancel()

    def end(self, stream: str) -> None:
        """Whatever happened to the request (even a cancellation before it started), its id
        is free again once its HTTP request is over."""
        self.writers.pop(stream, None)
        self.resumable.pop(stream, None)

    def detach(self, stream: str) -> None:
        """The stream's client left or the server closed it for polling: events are no longer
        written here (resumable ones are logged and published all the same)."""
        self.writers.pop(stream, None)

    async def _after_success(self, request: ClientRequest) -> None:
        """Keep what a successful ``initialize`` or ``logging/setLevel`` changed in the session's
        record, before the client can see the answer."""
        changed: Handshake | None = None
        if request.method == "initialize":
            changed = Handshake.from_connection(self.connection)
        elif request.method == "logging/setLevel" and self.handshake is not None:
            level = (request.params or {}).get("level")
            if isinstance(level, str):
                changed = self.handshake.with_log_level(level)
        if changed is not None:
            self.handshake = changed
            await self.endpoint.save_handshake(self.state, changed)
            self._handshake_text = self.state.handshake

    # -- what the server sends -------------------------------------------------------------------

    def wire_id(self, local: RequestId) -> str:
        return f"{self.endpoint.backplane.relay.worker}.{self.instance}.{local}"

    async def notify(
        self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None
    ) -> None:
        """The connection's standalone channel (the session's GET stream, on any worker)."""
        message = JSONRPCNotification(jsonrpc="2.0", method=method, params=_plain(params))
        await self.send_out(message, STANDALONE)

    async def send_raw_request(
        self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None
    ) -> dict[str, Any]:
        return await self.ask_client(method, params, opts, STANDALONE)

    async def ask_client(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        opts: CallOptions | None,
        stream: str,
    ) -> dict[str, Any]:
        """Send a request to the client on ``stream`` and wait for its answer, which may be
        POSTed to any worker (its id names this one)."""
        if self.ended:
            raise MCPError(code=CONNECTION_CLOSED, message="Session closed")
        self._next_id += 1
        local = self._next_id
        answer = self._asked[local] = _Answer()
        message = JSONRPCRequest(
            jsonrpc="2.0", id=self.wire_id(local), method=method, params=_plain(params)
        )
        timeout = (opts or {}).get("timeout")
        try:
            await self.send_out(message, stream)
            with anyio.fail_after(timeout if timeout is not None else math.inf):
                await answer.event.wait()
        except TimeoutError:
            cancel = {"requestId": self.wire_id(local), "reason": "timed out"}
            await self.send_out(
                JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled", params=cancel),
                stream,
            )
            raise MCPError(code=REQUEST_TIMEOUT, message=f"Request {method!r} timed out") from None
        finally:
            self._asked.pop(local, None)
            self._unlink_if_done()
        if isinstance(answer.outcome, ErrorData):
            raise MCPError.from_error_data(answer.outcome)
        return answer.outcome

    def answered(self, local: int, message: JSONRPCResponse | JSONRPCError) -> None:
        """The client's answer to one of this machinery's requests."""
        answer = self._asked.get(local)
        if answer is None:
            logger.debug("Answer to a request no longer waiting dropped")
            return
        answer.outcome = message.error if isinstance(message, JSONRPCError) else message.result
        answer.event.set()

    async def send_out(self, message: Any, stream: str, *, final: bool = False) -> None:
        """Log (resumable streams), publish (for followers on any worker), then write here."""
        if isinstance(message, JSONRPCNotification) and message.method == "notifications/message":
            level = self.handshake.log_level if self.handshake is not None else None
            if below_level(message.params, level):
                return
        await self.emit(message.model_dump_json(by_alias=True, exclude_unset=True), stream, final)

    async def emit(self, payload: str, stream: str, final: bool = False) -> None:
        """Send one serialized message: see :meth:`send_out`."""
        if final:
            await self._emit(payload, stream, final)
            return
        # An event on its way (being logged) counts as sent: an answer overtaking it must not
        # go out alone as if nothing had come before it.
        self._emitting[stream] = self._emitting.get(stream, 0) + 1
        try:
            await self._emit(payload, stream, final)
        finally:
            left = self._emitting[stream] - 1
            if left:
                self._emitting[stream] = left
            else:
                del self._emitting[stream]

    async def _emit(self, payload: str, stream: str, final: bool) -> None:
        event = Event(stream, None, payload, final)
        logged_as = self.resumable.get(stream)
        if final and logged_as is not None and stream not in self._emitting:
            # An answer that is the whole response (nothing of it was sent: no priming id, no
            # event id) can never be resumed; not logging it saves a store round trip.
            unseen = self.writers.get(stream)
            if unseen is not None and unseen.unseen:
                logged_as = None
        if logged_as is not None:
            logged = await self.endpoint.record(
                self.session_id, Event(logged_as, None, payload, final)
            )
            wire_id = None if logged.event_id is None else priming_id(logged.event_id, logged_as)
            event = Event(stream, wire_id, payload, final)  # (no id: the log failed to take it)
        elif stream == STANDALONE and self.endpoint.resumable:
            event = wire_event(await self.endpoint.record(self.session_id, event))
        elif stream == STANDALONE:
            await self.endpoint.publish(self.session_id, event)
        if final:
            self.resumable.pop(stream, None)
            writer = self.writers.pop(stream, None)
        else:
            writer = self.writers.get(stream)
        if writer is not None:
            try:  # noqa: SIM105 (contextlib.suppress: an object and two calls per answer)
                await writer.write(event)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass


_RUNNER_CALLBACKS = ("on_request", "on_notify")
"""The kernel's callbacks, ``functools.cached_property`` values kept in its ``__dict__``."""


def _fill_cached_callbacks(runner: ServerRunner[Any]) -> None:
    """Work out the kernel's cached callbacks now, as their properties do on first use.

    On Python 3.11 a ``cached_property`` takes a lock on first use (per class, not per
    instance), about 28 lines for the two of every new session's kernel; here each property's
    own function makes the value and it is kept where the property keeps it, so what the
    callbacks are is still the SDK's to say. Only the SDK's own class is filled, and only while
    its callbacks are plain ``cached_property`` objects (read from the class each time, so a
    later patch is seen); a subclass, or anything patched in, works as it does."""
    if type(runner) is not ServerRunner:
        return
    for name in _RUNNER_CALLBACKS:
        prop = ServerRunner.__dict__.get(name)
        if (
            type(prop) is functools.cached_property
            and prop.attrname == name  # (where the property keeps its value)
            and name not in runner.__dict__
        ):
            runner.__dict__[name] = prop.func(runner)


_TRANSPORTS = {
    can_send: TransportContext(kind="streamable-http", can_send_request=can_send)
    for can_send in (False, True)
}
"""The two transport contexts a request can have (frozen, without headers: shared)."""

_HANDSHAKE_CHANGES = frozenset({"initialize", "logging/setLevel"})
"""Requests whose success changes the session's stored handshake (see ``_after_success``)."""


_WIRE = TypeAdapter(dict[str, Any]).serializer
"""The serializer ``TypeAdapter.dump_json`` calls, called directly: its wrapper only forwards
keyword arguments, and it runs for every answer."""


def _answer_json(request_id: RequestId, result: dict[str, Any]) -> str:
    """A JSON-RPC response as the SDK's transports write it: keys in this order, models a
    middleware may have left in the result dumped by alias and without their unset fields."""
    answer = {"jsonrpc": "2.0", "id": request_id, "result": result}
    return _WIRE.to_json(answer, by_alias=True, exclude_unset=True).decode()


def _error_json(request_id: RequestId, error: ErrorData) -> str:
    try:
        return JSONRPCError(jsonrpc="2.0", id=request_id, error=error).model_dump_json(
            by_alias=True, exclude_unset=True
        )
    except ValueError:  # a message or data that cannot be written (a lone surrogate...)
        bare = ErrorData(code=error.code, message="Error")
        return JSONRPCError(jsonrpc="2.0", id=request_id, error=bare).model_dump_json()


def _enveloped(params: Mapping[str, Any] | None) -> bool:
    """A request carrying the 2026-07-28 per-request envelope (its protocol version in
    ``_meta``), which a handshake-era session does not serve, as in the SDK's own driver."""
    meta = (params or {}).get("_meta")
    return isinstance(meta, Mapping) and PROTOCOL_VERSION_META_KEY in meta


def _plain(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else dict(params)
