"""One session's SDK machinery in this worker, alive while a request or stream of it is open here.

This is what the SDK's stateful mode keeps per session (a dispatcher reading the session's
messages, a :class:`~mcp.server.connection.Connection` with its handshake, the response stream of
each request), rebuilt on any worker from the session's record and released when the worker's
last request of the session ends. The differences from the SDK's own transport are the ones that
let a session span workers:

- the connection is born initialized from the stored :class:`Handshake` (``initialize`` may have
  been served by another worker);
- a request sent to the client gets an id naming this worker and this machinery
  (``worker.instance.n``), so the client's answer, on whatever worker it lands, is relayed here;
- every message for a stream not open on this worker (the standalone GET stream, a request
  stream whose client left) is relayed to whoever holds it, after going into the event log when
  the stream is resumable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.connection import Connection
from mcp.server.runner import serve_connection
from mcp.shared._context_streams import create_context_streams
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from starlette.requests import Request

from mcp2anp_middleware.mcp_hosting.backplane import Event
from mcp2anp_middleware.mcp_hosting.handshake import Handshake, below_level, decoded
from mcp2anp_middleware.sessions.state import SessionState

if TYPE_CHECKING:
    from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint

logger = logging.getLogger("mcp2anp_middleware.mcp_hosting")

STANDALONE = "_GET_stream"
"""The stream of messages tied to no request: the session's GET stream."""

REQUEST_CANCELLED = -32800
"""The 2025-era wire ends a request's stream only with a response; a cancelled request gets this."""

STREAM_BUFFER = 16


class LiveSession:
    def __init__(self, endpoint: MCPEndpoint, state: SessionState, instance: int) -> None:
        self.endpoint = endpoint
        self.state = state
        self.session_id = state.session_id
        self.instance = instance
        self.users = 0
        self.sinks: dict[str, MemoryObjectSendStream[Event]] = {}
        """Response streams open on this worker, by stream (the request id as text)."""
        self.finished: dict[str, anyio.Event] = {}
        """Requests running here, set when their response has been routed."""
        self.resumable: set[str] = set()
        self.json_only: set[str] = set()
        self._set_levels: dict[str, str] = {}
        self._initializing: str | None = None
        self._handshake_text = state.handshake
        self.handshake = decoded(state.handshake) if state.handshake else None
        read_send, read_receive = create_context_streams[SessionMessage | Exception](0)
        write_send, write_receive = create_context_streams[SessionMessage](0)
        self._read_send = read_send
        self._write_send = write_send
        self._write_receive = write_receive
        self.dispatcher: JSONRPCDispatcher[TransportContext] = JSONRPCDispatcher(
            read_receive, write_send, inline_methods=frozenset({"initialize"})
        )
        self.connection = (
            self.handshake.connection(self.dispatcher, self.session_id)
            if self.handshake is not None
            else Connection.for_loop(self.dispatcher, session_id=self.session_id)
        )
        self.done = anyio.Event()

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`close`: the SDK's own per-connection kernel, fed by this worker."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._route)
                await serve_connection(
                    self.endpoint.lowlevel,
                    self.dispatcher,
                    connection=self.connection,
                    lifespan_state=self.endpoint.lifespan_state,
                )
                tasks.cancel_scope.cancel()
        except Exception:
            logger.exception("MCP session machinery failed")
        finally:
            for sink in self.sinks.values():
                sink.close()
            self.sinks.clear()
            for waiter in self.finished.values():
                waiter.set()
            self.done.set()

    def refresh(self) -> None:
        """Reused for a new request: pick up a handshake change (a log level set through another
        worker reaches this one with the session's record)."""
        text = self.state.handshake
        if text is not None and (self.handshake is None or text != self._handshake_text):
            self.handshake = decoded(text)
            self._handshake_text = text

    def close(self) -> None:
        """End the machinery: requests still running are cancelled, open streams end."""
        self._read_send.close()

    async def feed(self, message: Any, metadata: ServerMessageMetadata | None = None) -> None:
        """Hand a client message to the dispatcher, in the caller's context (so a handler sees
        the request's context variables, as under the SDK's own transport)."""
        try:
            await self._read_send.send(SessionMessage(message, metadata=metadata))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            logger.debug("Message for a session whose machinery has ended dropped")

    # -- requests --------------------------------------------------------------------------------

    def open_stream(
        self, request: JSONRPCRequest, http_request: Request, *, sse: bool, resumable: bool
    ) -> tuple[MemoryObjectReceiveStream[Event], anyio.Event, ServerMessageMetadata] | None:
        """Register the response stream of ``request``; None if its id is already in flight."""
        stream = str(request.id)
        if stream in self.finished:
            return None
        send, receive = anyio.create_memory_object_stream[Event](STREAM_BUFFER)
        self.sinks[stream] = send
        finished = self.finished[stream] = anyio.Event()
        if resumable:
            self.resumable.add(stream)
        if not sse:
            self.json_only.add(stream)
        if request.method == "initialize":
            self._initializing = stream
        elif request.method == "logging/setLevel" and isinstance(request.params, dict):
            level = request.params.get("level")
            if isinstance(level, str):
                self._set_levels[stream] = level
        closer: Callable[[], Awaitable[None]] | None = None
        standalone_closer: Callable[[], Awaitable[None]] | None = None
        if resumable:
            closer = partial(self._close_stream, stream)
            standalone_closer = self.endpoint.close_standalone_streams_callback(self.session_id)
        metadata = ServerMessageMetadata(
            request_context=http_request,
            close_sse_stream=closer,
            close_standalone_sse_stream=standalone_closer,
            on_request_unanswered=partial(self._unanswered, request.id),
            can_send_request=sse,
        )
        return receive, finished, metadata

    def detach_stream(self, stream: str) -> None:
        """The client left (or the stream was closed for polling): later messages of the stream
        go to the relay, where a resumed stream on any worker picks them up."""
        sink = self.sinks.pop(stream, None)
        if sink is not None:
            sink.close()

    async def _close_stream(self, stream: str) -> None:
        self.detach_stream(stream)

    async def _unanswered(self, request_id: RequestId) -> None:
        error = ErrorData(code=REQUEST_CANCELLED, message="Request cancelled")
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await self._write_send.send(
                SessionMessage(JSONRPCError(jsonrpc="2.0", id=request_id, error=error))
            )

    # -- what the server sends -------------------------------------------------------------------

    def wire_id(self, local: RequestId) -> str:
        return f"{self.endpoint.backplane.relay.worker}.{self.instance}.{local}"

    async def _route(self) -> None:
        async for item in self._write_receive:
            try:
                await self._send_out(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                continue
            except Exception:
                logger.exception("Could not route a message of an MCP session")

    async def _send_out(self, item: SessionMessage) -> None:
        message = item.message
        metadata = item.metadata
        final = False
        if isinstance(message, JSONRPCResponse | JSONRPCError):
            if message.id is None:
                stream = STANDALONE
            else:
                stream, final = str(message.id), True
                if isinstance(message, JSONRPCResponse):
                    await self._after_success(stream)
        elif (
            isinstance(metadata, ServerMessageMetadata) and metadata.related_request_id is not None
        ):
            stream = str(metadata.related_request_id)
            if stream in self.json_only:
                return  # a JSON body carries only the response
        else:
            stream = STANDALONE
        if isinstance(message, JSONRPCRequest):
            message = message.model_copy(update={"id": self.wire_id(message.id)})
        elif isinstance(message, JSONRPCNotification):
            if message.method == "notifications/message":
                level = self.handshake.log_level if self.handshake is not None else None
                if below_level(message.params, level):
                    return
            elif message.method == "notifications/cancelled" and isinstance(message.params, dict):
                params = dict(message.params)
                params["requestId"] = self.wire_id(params.get("requestId", ""))
                message = message.model_copy(update={"params": params})
        payload = message.model_dump_json(by_alias=True, exclude_unset=True)
        # A message of a resumable stream (and of the standalone stream) is logged, then
        # published for whoever follows the stream on any worker, before it is written here:
        # a client that left unnoticed loses nothing its resume cannot find.
        event = Event(stream, None, payload, final)
        if stream in self.resumable or (stream == STANDALONE and self.endpoint.resumable):
            event = await self.endpoint.record(self.session_id, event)
        elif stream == STANDALONE:
            await self.endpoint.publish(self.session_id, event)
        sink = self.sinks.get(stream)
        if sink is not None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await sink.send(event)
        if final:
            self._set_levels.pop(stream, None)
            self.resumable.discard(stream)
            self.json_only.discard(stream)
            if stream in self.sinks:
                self.sinks.pop(stream).close()
            waiter = self.finished.pop(stream, None)
            if waiter is not None:
                waiter.set()

    async def _after_success(self, stream: str) -> None:
        """Keep what a successful ``initialize`` or ``logging/setLevel`` changed in the session's
        record, before the client can see the answer."""
        changed: Handshake | None = None
        if stream == self._initializing:
            self._initializing = None
            changed = Handshake.from_connection(self.connection)
        elif (level := self._set_levels.pop(stream, None)) is not None and self.handshake:
            changed = self.handshake.with_log_level(level)
        if changed is not None:
            self.handshake = changed
            await self.endpoint.save_handshake(self.state, changed)
            self._handshake_text = self.state.handshake
