"""ASGI lifespan handling that works whether or not the wrapped app speaks lifespan.

The middleware's own startup runs first and its shutdown last. Messages are forwarded to the
wrapped app; if the app rejects lifespan (Django raises on it) or simply returns, the middleware
completes the protocol with the server by itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp2anp_middleware.logging_setup import exception_fields

logger = structlog.get_logger("mcp2anp_middleware.sessions.lifespan")


async def run_lifespan(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    message = await receive()
    if message["type"] != "lifespan.startup":  # pragma: no cover - protocol violation
        return
    try:
        await startup()
    except Exception as exc:
        logger.error("Middleware startup failed", **exception_fields())
        await send({"type": "lifespan.startup.failed", "message": str(exc)})
        return

    startup_answered = False
    shutdown_done = False
    first_message_delivered = False

    async def app_receive() -> Message:
        nonlocal first_message_delivered
        if not first_message_delivered:
            first_message_delivered = True
            return message
        return await receive()

    async def app_send(reply: Message) -> None:
        nonlocal startup_answered, shutdown_done
        kind = reply["type"]
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            startup_answered = True
            if kind == "lifespan.startup.failed":
                shutdown_done = True
                await shutdown()
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            shutdown_done = True
            await shutdown()
        await send(reply)

    try:
        await app(scope, app_receive, app_send)
    except Exception:
        if startup_answered:
            if not shutdown_done:
                await shutdown()
            raise
        logger.debug("Wrapped app does not support lifespan; the middleware answers it itself")
    if startup_answered:
        if not shutdown_done:
            await shutdown()
        return
    # The app declined lifespan: finish the protocol on its behalf.
    await send({"type": "lifespan.startup.complete"})
    while True:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
