"""The body deadline is a bare loop timer: it must behave as ``asyncio.timeout`` does, telling
its own expiry (``TimeoutError``) from a cancellation that came from elsewhere, and leaving no
cancellation behind in the task that read the body."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from starlette.types import Message

from mcp2anp_middleware.sessions.request_body import BodyTooLarge, ClientGone, read_body


async def never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def whole() -> Message:
    return {"type": "http.request", "body": b"{}", "more_body": False}


@pytest.mark.anyio
async def test_the_deadline_expiring_is_a_timeout_and_leaves_the_task_uncancelled() -> None:
    with pytest.raises(TimeoutError):
        await read_body(never, 100, within=0.01)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation is pending either


@pytest.mark.anyio
async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    reading = asyncio.ensure_future(read_body(never, 100, within=60))
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading


@pytest.mark.anyio
async def test_a_body_that_is_there_is_read_and_its_timer_dropped() -> None:
    loop = asyncio.get_running_loop()
    timers = len(getattr(loop, "_scheduled", []))
    assert await read_body(whole, 100, within=60) == b"{}"
    assert all(handle.cancelled() for handle in getattr(loop, "_scheduled", [])[timers:])


@pytest.mark.anyio
async def test_the_deadline_is_a_timeout_even_in_a_task_cancelled_before() -> None:
    """A cancellation caught earlier without ``uncancel`` is not this timer's: its expiry is
    still a timeout (a 408), not a cancellation (which the middleware would answer 503)."""

    async def read_after_a_caught_cancellation() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # caught, not uncancelled
            await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await read_body(never, 100, within=0.01)
        assert task.cancelling() == 1  # the earlier one is left as it was

    await asyncio.ensure_future(read_after_a_caught_cancellation())


@pytest.mark.anyio
async def test_a_body_that_is_there_arms_no_timer() -> None:
    """Servers hand over a body that came with its headers without suspending: no deadline
    is needed for it, and none is scheduled."""
    loop = asyncio.get_running_loop()
    before = list(getattr(loop, "_scheduled", []))
    assert await read_body(whole, 100, within=60) == b"{}"
    assert list(getattr(loop, "_scheduled", [])) == before


@pytest.mark.anyio
async def test_a_body_that_comes_after_a_wait_is_read_whole() -> None:
    """The first part is there, the rest comes later: the deadline is armed at the wait, the
    body read whole, and nothing of the deadline is left in the task."""
    parts = asyncio.Queue[Message]()
    parts.put_nowait({"type": "http.request", "body": b'{"a":', "more_body": True})
    reading = asyncio.ensure_future(read_body(parts.get, 100, within=60))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not reading.done()
    parts.put_nowait({"type": "http.request", "body": b"1}", "more_body": False})
    assert await reading == b'{"a":1}'
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@pytest.mark.anyio
async def test_a_body_whose_rest_never_comes_times_out() -> None:
    parts = asyncio.Queue[Message]()
    parts.put_nowait({"type": "http.request", "body": b'{"a":', "more_body": True})
    with pytest.raises(TimeoutError):
        await read_body(parts.get, 100, within=0.01)


@pytest.mark.anyio
async def test_a_body_that_comes_only_after_a_wait_is_read_whole() -> None:
    """Nothing is there at first: the first receive waits (the deadline armed), then the body
    comes in two parts."""
    parts = asyncio.Queue[Message]()
    reading = asyncio.ensure_future(read_body(parts.get, 100, within=60))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not reading.done()
    parts.put_nowait({"type": "http.request", "body": b'{"a":', "more_body": True})
    parts.put_nowait({"type": "http.request", "body": b"2}", "more_body": False})
    assert await reading == b'{"a":2}'


@pytest.mark.anyio
@pytest.mark.parametrize("more", [False, True])
async def test_a_body_over_the_limit_is_refused_however_it_comes(more: bool) -> None:
    parts = asyncio.Queue[Message]()
    if more:  # over the limit with its second part
        parts.put_nowait({"type": "http.request", "body": b"x" * 60, "more_body": True})
        parts.put_nowait({"type": "http.request", "body": b"y" * 60, "more_body": False})
    else:  # over the limit in one part
        parts.put_nowait({"type": "http.request", "body": b"x" * 120, "more_body": False})
    with pytest.raises(BodyTooLarge):
        await read_body(parts.get, 100, within=60)
    with pytest.raises(BodyTooLarge):  # declared too large: refused before any receive
        await read_body(never, 100, within=60, declared=b"101")


@pytest.mark.anyio
async def test_a_client_gone_before_its_body_came_is_told_apart() -> None:
    parts = asyncio.Queue[Message]()
    parts.put_nowait({"type": "http.request", "body": b"{", "more_body": True})
    parts.put_nowait({"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        await read_body(parts.get, 100, within=60)


class _PlainAwaitable:
    """An awaitable whose iterator is not a generator (no ``send``), as some ASGI servers'
    ``receive`` returns: it yields ``waits`` times, then gives ``message``."""

    def __init__(self, message: Message, waits: int) -> None:
        self._message = message
        self._waits = waits

    def __await__(self) -> _PlainIterator:
        return _PlainIterator(self._message, self._waits)


class _PlainIterator:
    def __init__(self, message: Message, waits: int) -> None:
        self._message = message
        self._waits = waits

    def __iter__(self) -> _PlainIterator:
        return self

    def __next__(self) -> None:
        if self._waits:
            self._waits -= 1
            return None  # a bare yield: the task runs again on the next loop iteration
        raise StopIteration(self._message)


@pytest.mark.anyio
@pytest.mark.parametrize("waits", [0, 2])
async def test_a_receive_that_is_no_coroutine_is_awaited_as_it_is(waits: int) -> None:
    def receive() -> Any:
        return _PlainAwaitable({"type": "http.request", "body": b"{}", "more_body": False}, waits)

    assert await read_body(receive, 100, within=60) == b"{}"


@pytest.mark.anyio
async def test_a_body_given_as_a_bytearray_comes_back_as_bytes() -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": bytearray(b"{}"), "more_body": False}

    body = await read_body(receive, 100, within=60)
    assert body == b"{}" and type(body) is bytes


class _SendNoThrow:
    """An await iterator with a ``send`` but no ``throw``: not stepped by ``read_body`` itself,
    so a deadline or a cancellation still reaches it as ``await`` would deliver them."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __iter__(self) -> _SendNoThrow:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        self._future._asyncio_future_blocking = True  # as Future.__await__ yields it
        return self._future  # waits for ever


@pytest.mark.anyio
async def test_an_await_iterator_without_throw_still_times_out() -> None:
    class Pending:
        def __await__(self) -> Any:
            return _SendNoThrow()

    with pytest.raises(TimeoutError):
        await read_body(lambda: Pending(), 100, within=0.01)
