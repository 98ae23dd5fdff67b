"""The SSE writer's held start: a request's headers and priming event go out with its first
event (or when the hold is over), first on the wire, whoever writes and however sends interleave.
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from mcp2anp_middleware.mcp_hosting.backplane import Event
from mcp2anp_middleware.mcp_hosting.sse import HoldTimer, SSEWriter

pytestmark = pytest.mark.anyio


class Wire:
    """An ASGI ``send`` that suspends while sending the headers (as flow control or any awaiting
    send wrapper may) and refuses a body before them, as servers do."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.sent_something = asyncio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(0)
        elif not any(m["type"] == "http.response.start" for m in self.messages):
            raise RuntimeError("body before start")
        self.messages.append(message)
        self.sent_something.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]


PRIMING = Event("7", "cursor.w.1.1", None)


async def test_the_held_start_and_priming_go_out_with_the_first_event() -> None:
    wire = Wire()
    writer = SSEWriter(wire.send)
    writer.begin_held(PRIMING, retry_ms=1000, hold=HoldTimer(60))
    assert wire.messages == [] and writer.unseen
    await writer.write(Event("7", None, '{"note":1}'))
    assert [m["type"] for m in wire.messages] == ["http.response.start", "http.response.body"]
    assert not writer.unseen
    body = wire.bodies()[0]
    assert body.startswith(b"id: cursor.w.1.1\nretry: 1000\ndata: \n\n")
    assert body.endswith(b'event: message\ndata: {"note":1}\n\n')
    await writer.write(Event("7", "cursor.w.1.2", '{"answer":1}', True))
    assert wire.bodies()[1] == b'id: cursor.w.1.2\nevent: message\ndata: {"answer":1}\n\n'
    assert wire.messages[-1]["more_body"] is False and not writer.open


async def test_an_answer_that_comes_while_held_is_the_whole_json_response() -> None:
    """Nothing to stream and nothing to resume: the client gets the answer as JSON, and no
    priming event (it could never use it)."""
    wire = Wire()
    writer = SSEWriter(wire.send)
    writer.begin_held(PRIMING, retry_ms=1000, hold=HoldTimer(60))
    await writer.write(Event("7", None, '{"answer":1}', True))
    start, body = wire.messages
    assert start["status"] == 200
    assert dict(start["headers"]) == {
        b"content-type": b"application/json",
        b"content-length": b"12",
    }
    assert body == {"type": "http.response.body", "body": b'{"answer":1}', "more_body": False}
    assert not writer.open
    await writer.finish()  # nothing more goes out
    assert len(wire.messages) == 2


async def test_concurrent_events_wait_for_the_held_start_in_flight() -> None:
    """Two tasks of one request write at once while the headers are being sent: the second
    waits, nothing is written before the headers, the stream stays open for the answer."""
    wire = Wire()
    writer = SSEWriter(wire.send)
    writer.begin_held(None, retry_ms=None, hold=HoldTimer(60))
    await asyncio.gather(
        writer.write(Event("7", None, '{"p":1}')), writer.write(Event("7", None, '{"p":2}'))
    )
    assert writer.open
    await writer.write(Event("7", None, '{"answer":1}', True))
    assert wire.bodies() == [
        b'event: message\ndata: {"p":1}\n\n',
        b'event: message\ndata: {"p":2}\n\n',
        b'event: message\ndata: {"answer":1}\n\n',
    ]


async def test_when_the_hold_is_over_the_start_and_priming_go_out_alone() -> None:
    wire = Wire()
    writer = SSEWriter(wire.send)
    writer.begin_held(PRIMING, retry_ms=None, hold=HoldTimer(0))
    await asyncio.wait_for(wire.sent_something.wait(), 10)
    while len(wire.messages) < 2:  # noqa: ASYNC110 (the flush task's second send)
        await asyncio.sleep(0)
    assert wire.bodies() == [b"id: cursor.w.1.1\ndata: \n\n"]
    assert wire.messages[-1]["more_body"] is True
    await writer.write(Event("7", None, '{"answer":1}', True))
    assert wire.bodies()[-1] == b'event: message\ndata: {"answer":1}\n\n'


async def test_finishing_a_held_stream_sends_what_is_held_and_ends_it() -> None:
    wire = Wire()
    writer = SSEWriter(wire.send)
    writer.begin_held(PRIMING, retry_ms=None, hold=HoldTimer(60))
    writer.stop_holding()
    await writer.finish()
    assert wire.bodies() == [b"id: cursor.w.1.1\ndata: \n\n"]
    assert wire.messages[-1]["more_body"] is False


async def test_the_hold_timer_runs_the_callers_work_once_even_after_an_early_event() -> None:
    """A stream nobody can resume starts its disconnect watch on this timer: an event written
    before the hold is over must not take the watch's start with it."""
    wire = Wire()
    writer = SSEWriter(wire.send)
    over: list[int] = []
    writer.begin_held(None, retry_ms=None, hold=HoldTimer(0), on_hold_over=lambda: over.append(1))
    # Written before the loop ran the timer: it takes the held start with it, and the timer
    # fires while the start is being sent (the wire yields to the loop there).
    await writer.write(Event("7", None, '{"note":1}'))
    assert [m["type"] for m in wire.messages] == ["http.response.start", "http.response.body"]
    for _ in range(3):
        await asyncio.sleep(0)
    assert over == [1]
    writer.stop_holding()
    assert over == [1]


async def test_a_request_over_before_its_hold_never_runs_the_callers_work() -> None:
    wire = Wire()
    writer = SSEWriter(wire.send)
    over: list[int] = []
    writer.begin_held(None, retry_ms=None, hold=HoldTimer(0), on_hold_over=lambda: over.append(1))
    await writer.write(Event("7", None, '{"answer":1}', True))  # the whole response, as JSON
    writer.stop_holding()
    for _ in range(3):
        await asyncio.sleep(0)
    assert over == []


async def test_one_timer_serves_holds_in_the_order_they_fall_due() -> None:
    """Holds cancelled before they are due never run; the others run once each, in order, and
    the timer is armed only while a hold waits."""
    timer = HoldTimer(0)
    ran: list[str] = []
    first = timer.hold(lambda: ran.append("first"))
    cancelled = timer.hold(lambda: ran.append("cancelled"))
    timer.hold(lambda: ran.append("third"))
    cancelled.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert ran == ["first", "third"]
    assert timer._timer is None and not timer._queue
    first.cancel()  # after it ran: nothing happens
    timer.hold(lambda: ran.append("later"))
    assert timer._timer is not None
    for _ in range(3):
        await asyncio.sleep(0)
    assert ran == ["first", "third", "later"]


async def test_a_hold_not_yet_due_waits_behind_the_timer_of_the_first() -> None:
    timer = HoldTimer(60)
    ran: list[int] = []
    early = timer.hold(lambda: ran.append(1))
    timer.hold(lambda: ran.append(2))
    early.cancel()
    timer._fire(timer._queue)  # fires for a cancelled hold: the next one is armed, not run
    assert ran == [] and timer._timer is not None
    assert timer._timer.when() == timer._queue[0].due
    timer._timer.cancel()


async def test_a_raising_callback_leaves_the_timer_armed_for_the_rest() -> None:
    timer = HoldTimer(0)
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    timer.hold(boom)
    timer.hold(lambda: ran.append(1))
    timer._queue[1].due = asyncio.get_running_loop().time() + 60  # not due yet
    with pytest.raises(RuntimeError):
        timer._fire(timer._queue)
    assert timer._timer is not None and ran == []
    timer._timer.cancel()


async def test_a_timer_armed_for_holds_since_replaced_does_nothing() -> None:
    """A timer armed before the holds moved to another queue (a new loop) finds nothing of its
    own to do, and leaves the timer of the new holds alone."""
    timer = HoldTimer(60)
    timer.hold(lambda: None)
    old_queue = timer._queue
    current = timer._timer
    timer._queue = type(old_queue)()  # what a move to another loop does
    timer._fire(old_queue)
    assert timer._timer is current
    assert current is not None
    current.cancel()
