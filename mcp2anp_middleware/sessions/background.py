"""The middleware's background work: the cleanup loop and any services (the MCP SDK's session
manager) that must run for as long as the server does.

Everything runs inside one dedicated task, so anyio task groups that services open are entered and
exited in the same task no matter who calls :meth:`start` and :meth:`stop` (the lifespan task, or
the first request on servers that send no lifespan events).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import structlog

from mcp2anp_middleware.cancel_scope import cancel_and_wait
from mcp2anp_middleware.logging_setup import exception_fields
from mcp2anp_middleware.sessions.registry import SessionRegistry

logger = structlog.get_logger("mcp2anp_middleware.sessions.background")

Service = Callable[[], AbstractAsyncContextManager[object]]
Sleep = Callable[[float], Awaitable[object]]


class BackgroundRunner:
    """Starts once, stops once; :meth:`start` is idempotent and safe to race."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        cleanup_interval: float,
        services: Sequence[Service] = (),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if cleanup_interval <= 0:
            raise ValueError("cleanup_interval must be positive")
        self.registry = registry
        self.cleanup_interval = cleanup_interval
        self.services = list(services)
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop: asyncio.Event | None = None
        self._up = False
        """Set by the task once everything started, cleared as it ends or is told to stop."""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def ready(self) -> bool:
        """Services started and the loop running (not merely starting). Every request asks,
        so it is a flag the task keeps, not worked out from the task and its futures."""
        return self._up

    async def start(self) -> None:
        """Start services and the cleanup loop; returns once they are ready, raises if they fail."""
        if self._ready is None or (self._task is not None and self._task.done()):
            loop = asyncio.get_running_loop()  # first start, or the task died: start again
            self._ready = loop.create_future()
            self._stop = asyncio.Event()
            self._task = loop.create_task(self._main(), name="mcp2anp-middleware-background")
        ready = self._ready
        try:
            await asyncio.shield(ready)
        except BaseException:
            failed = ready.done() and (ready.cancelled() or ready.exception() is not None)
            if failed and self._ready is ready:  # a failed start (not this caller cancelled)
                self._task = self._ready = self._stop = None
            raise

    async def stop(self) -> None:
        """Stop the loop and the services and wait until they are gone."""
        task, self._task = self._task, None
        self._up = False
        if task is None:
            return
        assert self._stop is not None
        self._stop.set()
        with contextlib.suppress(Exception):
            await task
        self._ready = None
        self._stop = None

    async def _main(self) -> None:
        assert self._ready is not None and self._stop is not None
        try:
            async with AsyncExitStack() as stack:
                for service in self.services:
                    await stack.enter_async_context(service())
                sweeper = asyncio.create_task(self._cleanup_loop(), name="mcp2anp-session-cleanup")
                self._ready.set_result(None)
                try:
                    self._up = True
                    logger.debug("Session cleanup task started", interval=self.cleanup_interval)
                    await self._stop.wait()
                finally:
                    self._up = False
                    await cancel_and_wait(sweeper)  # (a sweep's store call may swallow one)
                    logger.debug("Session cleanup task stopped")
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
                return
            raise

    async def _cleanup_loop(self) -> None:
        while True:
            await self._sleep(self.cleanup_interval)
            try:
                await self.registry.sweep()
            except Exception:
                text = "Session cleanup failed; will retry at the next interval"
                logger.error(text, **exception_fields())
