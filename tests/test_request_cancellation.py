"""A request's own cancel scope: it cancels the serving task only inside its block, never
mistakes another cancellation for its own, and keeps a cancellation back while shielded; and
end to end, a client's ``notifications/cancelled`` and a DELETE end a running tool call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import httpx
import pytest

from mcp2anp_middleware.cancel_scope import RequestCancellation

from .fidelity_server import Gate
from .test_full_sessions import RawClient, answer_events, workers

pytestmark = pytest.mark.anyio


async def test_a_cancel_from_another_task_ends_the_block_and_is_taken_back() -> None:
    scope = RequestCancellation()
    waiting = asyncio.Event()
    reached_end = False

    async def serve() -> None:
        nonlocal reached_end
        with scope:
            waiting.set()
            await asyncio.sleep(3600)
            reached_end = True
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        await asyncio.sleep(0)  # nothing left pending for the task

    task = asyncio.ensure_future(serve())
    await waiting.wait()
    scope.cancel()
    await task
    assert scope.called and not reached_end


async def test_another_cancellation_of_the_task_is_never_swallowed() -> None:
    scope = RequestCancellation()
    waiting = asyncio.Event()

    async def serve() -> None:
        with scope:
            waiting.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(serve())
    await waiting.wait()
    scope.cancel()
    task.cancel()  # the server gives up on the request at the same time
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancel_from_the_serving_task_lands_at_its_next_wait_in_the_block() -> None:
    scope = RequestCancellation()
    reached_end = False
    with anyio.fail_after(10), scope:
        scope.cancel()
        await asyncio.sleep(3600)  # the cancellation lands here, and ends the block
        reached_end = True
    assert not reached_end
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    await asyncio.sleep(0)  # nothing left pending for the task


async def test_a_cancel_from_the_serving_task_after_its_block_is_dropped() -> None:
    scope = RequestCancellation()
    with scope:
        scope.cancel()  # delivered on the next loop iteration: the block ends first
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_shielded_part_keeps_the_cancellation_back() -> None:
    scope = RequestCancellation()
    waiting = asyncio.Event()
    go_on = asyncio.Event()
    finished = False

    async def serve() -> None:
        nonlocal finished
        with scope:
            scope.shielded = True
            waiting.set()
            await go_on.wait()
            scope.shielded = False
            finished = True

    task = asyncio.ensure_future(serve())
    await waiting.wait()
    scope.cancel()
    go_on.set()
    await task
    assert finished and scope.called


async def test_a_cancel_after_the_block_does_nothing() -> None:
    scope = RequestCancellation()
    with scope:
        pass
    scope.cancel()
    await asyncio.sleep(0)
    assert scope.called


async def test_the_client_cancels_a_running_tool_call(tmp_path: Path) -> None:
    """``notifications/cancelled`` ends the call (answered -32800, the session kept); the
    session serves the next call."""
    gate = Gate()
    async with workers(tmp_path, 1, None, gate) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "slow"}}
        running = asyncio.ensure_future(http.post(worker.url, json=call, headers=client.headers()))
        with anyio.fail_after(10):
            await gate.started.wait()
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 7, "reason": "test"},
        }
        sent = await http.post(worker.url, json=cancel, headers=client.headers())
        assert sent.status_code == 202
        with anyio.fail_after(10):
            answer = await running
        final = answer_events(answer)[-1]["data"]
        assert final["id"] == 7 and final["error"]["code"] == -32800, final
        assert worker.app.registry.in_flight == 0
        assert not worker.app.endpoint.live[client.session_id].running
        gate.released.set()
        events = await client.call(worker.url, 8, "slow")
        assert events[-1]["data"]["result"]["content"][0]["text"] == "slow done"


async def test_deleting_the_session_ends_its_running_tool_call(tmp_path: Path) -> None:
    gate = Gate()
    async with workers(tmp_path, 1, None, gate) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "slow"}}
        running = asyncio.ensure_future(http.post(worker.url, json=call, headers=client.headers()))
        with anyio.fail_after(10):
            await gate.started.wait()
        deleted = await http.delete(worker.url, headers=client.headers())
        assert deleted.status_code == 204
        with anyio.fail_after(10):
            answer = await running
        final = answer_events(answer)[-1]["data"]
        assert final["id"] == 3 and "error" in final and "result" not in final, final
        assert worker.app.registry.in_flight == 0
