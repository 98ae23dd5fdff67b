"""The body deadline is a bare loop timer: it must behave as ``asyncio.timeout`` does, telling
its own expiry (``TimeoutError``) from a cancellation that came from elsewhere, and leaving no
cancellation behind in the task that read the body."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from starlette.types import Message

from mcp2anp_middleware.sessions.request_body import read_body

SCOPE = {"type": "http", "headers": []}


async def never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def whole() -> Message:
    return {"type": "http.request", "body": b"{}", "more_body": False}


@pytest.mark.anyio
async def test_the_deadline_expiring_is_a_timeout_and_leaves_the_task_uncancelled() -> None:
    with pytest.raises(TimeoutError):
        await read_body(SCOPE, never, 100, within=0.01)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation is pending either


@pytest.mark.anyio
async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    reading = asyncio.ensure_future(read_body(SCOPE, never, 100, within=60))
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading


@pytest.mark.anyio
async def test_a_body_that_is_there_is_read_and_its_timer_dropped() -> None:
    loop = asyncio.get_running_loop()
    timers = len(getattr(loop, "_scheduled", []))
    assert await read_body(SCOPE, whole, 100, within=60) == b"{}"
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
            await read_body(SCOPE, never, 100, within=0.01)
        assert task.cancelling() == 1  # the earlier one is left as it was

    await asyncio.ensure_future(read_after_a_caught_cancellation())
