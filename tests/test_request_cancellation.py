"""A client's ``notifications/cancelled`` and a DELETE end a running tool call, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .fidelity_server import Gate
from .test_full_sessions import RawClient, Worker, answer_events, workers

pytestmark = pytest.mark.anyio


@dataclass
class SlowCall:
    """A session whose ``slow`` tool call (``request_id``) is running, held by ``gate``."""

    worker: Worker
    http: httpx.AsyncClient
    client: RawClient
    gate: Gate
    running: asyncio.Future[httpx.Response]

    async def answer(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            response = await self.running
        final: dict[str, Any] = answer_events(response)[-1]["data"]
        return final


@asynccontextmanager
async def slow_call(tmp_path: Path, request_id: int) -> AsyncIterator[SlowCall]:
    gate = Gate()
    async with workers(tmp_path, 1, None, gate) as (worker,), httpx.AsyncClient() as http:
        client = RawClient(http)
        await client.initialize(worker.url)
        params = {"name": "slow"}
        call = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        running = asyncio.ensure_future(http.post(worker.url, json=call, headers=client.headers()))
        with anyio.fail_after(10):
            await gate.started.wait()
        yield SlowCall(worker, http, client, gate, running)


async def test_the_client_cancels_a_running_tool_call(tmp_path: Path) -> None:
    """``notifications/cancelled`` ends the call (answered -32800, the session kept); the
    session serves the next call."""
    async with slow_call(tmp_path, 7) as slow:
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 7, "reason": "test"},
        }
        sent = await slow.http.post(slow.worker.url, json=cancel, headers=slow.client.headers())
        assert sent.status_code == 202
        final = await slow.answer()
        assert final["id"] == 7 and final["error"]["code"] == -32800, final
        assert slow.worker.app.registry.in_flight == 0
        assert not slow.worker.app.endpoint.live[slow.client.session_id].running
        slow.gate.released.set()
        events = await slow.client.call(slow.worker.url, 8, "slow")
        assert events[-1]["data"]["result"]["content"][0]["text"] == "slow done"


async def test_deleting_the_session_ends_its_running_tool_call(tmp_path: Path) -> None:
    async with slow_call(tmp_path, 3) as slow:
        deleted = await slow.http.delete(slow.worker.url, headers=slow.client.headers())
        assert deleted.status_code == 204
        final = await slow.answer()
        assert final["id"] == 3 and "error" in final and "result" not in final, final
        assert slow.worker.app.registry.in_flight == 0
