"""A client's ``notifications/cancelled`` and a DELETE end a running tool call, end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import httpx
import pytest

from .fidelity_server import Gate
from .test_full_sessions import RawClient, answer_events, workers

pytestmark = pytest.mark.anyio


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
