"""Server-sent events on a raw ASGI ``send``: what a response stream of MCP looks like on the wire.

Written here rather than borrowed from a response class because a stream must outlive its
client: when the client goes away (or the server closes the stream for polling), the request goes
on and its later events wait in the event log for a resume, so the writer only has to stop
writing, never to fail.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from starlette.types import Send

from mcp2anp_middleware.mcp_hosting.backplane import Event

HOLD_SECONDS = 0.1
"""How long a request's response headers and priming event wait for its first event, to go out
in one write with it (see :meth:`SSEWriter.begin_held`)."""


SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class Hold:
    """One request's hold, due at ``due`` (loop time); :meth:`cancel` before then, and its
    callback never runs."""

    __slots__ = ("callback", "due")

    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class HoldTimer:
    """The holds of every request on one event loop, served by one loop timer at a time.

    Every request starts a hold (its answer usually comes within it, and the hold is cancelled),
    and a loop timer per request cost more than the rest of the hold: a timer handle, a push on
    the loop's heap and, once cancelled, a heap entry left behind until the loop prunes it. All
    holds last the same ``seconds``, so they fall due in the order they began: a queue in that
    order, and one timer for the earliest hold still waiting, does the same work. Under steady
    traffic the timer fires about once per ``seconds`` and finds the holds before it cancelled.
    One event loop at a time: holds begun on another loop replace the earlier loop's.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._queue: deque[Hold] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def hold(self, callback: Callable[[], None]) -> Hold:
        """Call ``callback`` in ``seconds``, unless the returned hold is cancelled first."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # (a timer on a loop no longer running would never fire)
            self._loop, self._queue, self._timer = loop, deque(), None
        hold = Hold(loop.time() + self.seconds, callback)
        self._queue.append(hold)
        if self._timer is None:
            self._timer = loop.call_at(hold.due, self._fire, self._queue)
        return hold

    def _fire(self, queue: deque[Hold]) -> None:
        if queue is not self._queue:  # a timer of a loop this one has left: its holds went too
            return
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            while queue and (queue[0].callback is None or queue[0].due <= now):
                callback = queue.popleft().callback
                if callback is not None:
                    callback()
        finally:  # (a callback that raised is the loop's to report; the others still run)
            if queue:
                self._timer = loop.call_at(queue[0].due, self._fire, queue)


async def send_json(send: Send, body: bytes) -> None:
    """A whole response of one JSON body (an answer nothing was streamed before)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class SSEWriter:
    """Writes events until the client is gone; ``open`` tells whether writing still reaches it.

    A request's stream begins *held*: its headers and priming event wait (at most ``hold``
    seconds, see :meth:`begin_held`) for its first real event. If that event is the answer, the
    response is plain JSON: there was nothing to stream, and nothing to resume (the client never
    saw an event id). Otherwise the held part goes out with the event, so a request costs the
    server two writes (headers, then the body) instead of three or four.
    """

    # What a new writer starts with, as class attributes: a writer is made for every request,
    # and sets only what changes.
    open = True
    started = False
    unseen = False
    """Held, nothing of the response sent yet: its answer, if it comes now, goes out alone as
    JSON, and the client never holds an id to resume it with."""
    _held_priming: tuple[Event, int | None] | None = None
    """The priming event held with the start (framed only if it goes out)."""
    _held_sent: asyncio.Future[None] | None = None
    """Done once the held part is on the wire: every other write waits for it."""
    _flush_task: asyncio.Task[None] | None = None
    """The task sending what is held when the hold is over (kept: tasks are weakly held)."""
    _hold: Hold | None = None
    _on_hold_over: Callable[[], None] | None = None

    def __init__(self, send: Send) -> None:
        self._send = send

    async def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        await self._write_raw(None, [*SSE_HEADERS, *headers])

    def begin_held(
        self,
        priming: Event | None,
        *,
        retry_ms: int | None,
        hold: HoldTimer,
        on_hold_over: Callable[[], None] | None = None,
    ) -> None:
        """Start the response (with ``priming``, an id to resume from, if given), held back
        until the first event, the end of the stream, or ``hold.seconds``, whichever is first.

        Holding is safe: the priming event still precedes everything else on the wire, and a
        client needs it only if the request outlives a quick answer. ``on_hold_over`` is called
        once the hold is over, unless the request ended first (:meth:`stop_holding`): a request
        that runs that long gets its other timed work started by the same timer. (The held start
        is made when it goes out: most requests are answered alone.)"""
        self.unseen = True
        if priming is not None:  # (else the class default, None: a writer begins held once)
            self._held_priming = (priming, retry_ms)
        self.started = True
        self._on_hold_over = on_hold_over
        self._hold = hold.hold(self._flush_soon)

    def stop_holding(self) -> None:
        """No flush after the hold any more (the request is over; :meth:`finish` sends what is
        still held)."""
        self._on_hold_over = None
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    async def event(self, event: Event) -> None:
        """Write one event of a GET stream (it ends with :meth:`finish`)."""
        await self._write_raw(_frame(event, None))

    async def write(self, event: Event) -> None:
        """A request's event; its answer (``final``) ends the response, as the whole JSON body
        if nothing was sent before it."""
        if event.final:
            if self.unseen and event.event_id is None and event.payload:
                # The answer came while the start was held (and was not logged: a logged one
                # has an id): it is the response, as JSON. No other writer can be sending: one
                # would have taken the held start, and none comes after the answer. The hold
                # is over with it.
                self.unseen = False
                self._held_priming = None
                self.open = False
                self._on_hold_over = None
                if self._hold is not None:
                    self._hold.cancel()
                    self._hold = None
                try:  # noqa: SIM105 (contextlib.suppress: an object and two calls per answer)
                    await send_json(self._send, event.payload.encode())
                except Exception:  # the client is gone (servers differ in how they say so)
                    pass
                return
            await self._write_raw(_frame(event, None), more=False)
            self.open = False
            return
        await self._write_raw(_frame(event, None))

    async def keepalive(self) -> None:
        await self._write_raw(b": keepalive\n\n")

    async def finish(self) -> None:
        if self.open and self.started:
            await self._write_raw(b"", more=False)
        self.open = False

    def _flush_soon(self) -> None:
        """The hold is over: send what is held now (in a task of its own: sending awaits)."""
        self._hold = None
        if self.unseen:
            self._flush_task = asyncio.ensure_future(self._flush_held())
        on_hold_over, self._on_hold_over = self._on_hold_over, None
        if on_hold_over is not None:
            on_hold_over()

    async def _flush_held(self) -> None:
        if self.unseen:  # else an event took it with it meanwhile
            await self._write_raw(b"")

    async def _write_raw(
        self,
        body: bytes | None,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        more: bool = True,
    ) -> None:
        held_sent = self._held_sent
        if held_sent is not None and not held_sent.done():
            await asyncio.shield(held_sent)  # the held part is on its way: stay behind it
        if not self.open:
            return
        try:
            if self.unseen:
                self.unseen = False
                start = {"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)}
                priming, self._held_priming = self._held_priming, None
                held = b"" if priming is None else _frame(*priming)
                if self._hold is not None and self._on_hold_over is None:
                    self._hold.cancel()  # (kept when it has more to do when the hold is over)
                    self._hold = None
                self._held_sent = asyncio.get_running_loop().create_future()
                try:
                    await self._send(start)
                    body = held + (body or b"")
                    message = {"type": "http.response.body", "body": body, "more_body": more}
                    await self._send(message)
                finally:
                    self._held_sent.set_result(None)
            elif headers is not None:
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
                self.started = True
            else:
                await self._send({"type": "http.response.body", "body": body, "more_body": more})
        except Exception:  # the client is gone (servers differ in how they say so)
            self.open = False


def _frame(event: Event, retry_ms: int | None) -> bytes:
    """One event as SSE lines."""
    lines = []
    if event.event_id is not None:
        lines.append(f"id: {event.event_id}")
    if retry_ms is not None:
        lines.append(f"retry: {retry_ms}")
    if event.payload is None:
        lines.append("data: ")  # a priming event: an id to resume from, nothing to read
    else:
        lines.append("event: message")
        lines.append(f"data: {event.payload}")
    return ("\n".join(lines) + "\n\n").encode()
