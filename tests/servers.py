"""Real uvicorn servers on loopback for end-to-end tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve(app: Any, *, port: int | None = None, lifespan: str = "on") -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in this event loop; yield its base URL."""
    async with uvicorn_server(app, port=port, lifespan=lifespan) as (base_url, _):
        yield base_url


@asynccontextmanager
async def uvicorn_server(
    app: Any, *, port: int | None = None, lifespan: str = "on", graceful_timeout: float = 10
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Like :func:`serve`, also yielding the server (a test may start its shutdown)."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan=lifespan,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task
