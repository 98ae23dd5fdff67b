"""Lifespan handling: with a lifespan-aware host, a host that rejects it, and no lifespan at all."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mcp2anp_middleware import MCPSessionMiddleware, frozen_startup_heap
from mcp2anp_middleware.sessions import background as background_module
from mcp2anp_middleware.sessions.background import BackgroundRunner
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.policy import SessionPolicy
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.stores import StoreUnavailable

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT

pytestmark = pytest.mark.anyio


def background_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("mcp2anp")]


async def test_cleanup_task_runs_between_startup_and_shutdown() -> None:
    host = HostApp()
    middleware = MCPSessionMiddleware(host, mcp_app=RecordingMCPApp(), clock=ManualClock())
    async with LifespanManager(middleware) as manager:
        assert middleware.background.running
        assert len(background_tasks()) == 2  # runner + cleanup loop
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).text == "host"
    assert host.lifespan_events == ["lifespan.startup", "lifespan.shutdown"]
    assert not middleware.background.running
    assert background_tasks() == []


async def test_host_starlette_lifespan_still_runs() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("host-up")
        yield
        events.append("host-down")

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    host = Starlette(routes=[Route("/hello", hello)], lifespan=lifespan)
    middleware = MCPSessionMiddleware(host, mcp_app=RecordingMCPApp())
    async with LifespanManager(middleware):
        assert events == ["host-up"] and middleware.background.running
    assert events == ["host-up", "host-down"]
    assert background_tasks() == []


async def test_app_that_raises_on_lifespan_like_django() -> None:
    host = HostApp(lifespan="raises")
    middleware = MCPSessionMiddleware(host, mcp_app=RecordingMCPApp())
    async with LifespanManager(middleware) as manager:
        assert middleware.background.running
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/mcp", json=INIT)
            assert response.status_code == 200
    assert not middleware.background.running
    assert background_tasks() == []


async def test_without_lifespan_the_loop_starts_on_first_request() -> None:
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp())
    assert not middleware.background.running
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/elsewhere")
        assert not middleware.background.running  # requests outside the prefix do not start it
        await client.post("/mcp", json=INIT)
        assert middleware.background.running
    await middleware.shutdown()
    assert background_tasks() == []


async def test_cleanup_loop_sweeps_each_interval() -> None:
    """The loop's sleep is injected, so the test drives intervals without waiting for them."""
    ticks: asyncio.Queue[None] = asyncio.Queue()
    intervals: list[float] = []
    swept = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        intervals.append(seconds)
        await ticks.get()

    clock = ManualClock()
    middleware = MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        clock=clock,
        policy=SessionPolicy(timeout=60, cleanup_interval=15),
    )
    # The cleanup loop's sleep is its test seam: a runner that sleeps until the test says so.
    middleware.background = BackgroundRunner(
        middleware.registry, cleanup_interval=15, sleep=fake_sleep
    )
    original_sweep = middleware.registry.sweep

    async def observed_sweep() -> int:
        removed = await original_sweep()
        swept.set()
        return removed

    middleware.registry.sweep = observed_sweep  # type: ignore[method-assign]
    async with LifespanManager(middleware) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/mcp", json=INIT)
        assert len(middleware.registry) == 1
        clock.advance(61)
        ticks.put_nowait(None)
        await swept.wait()
        assert len(middleware.registry) == 0
        assert intervals[0] == 15
    assert background_tasks() == []


async def test_failing_service_fails_startup() -> None:
    @asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise RuntimeError("service could not start")
        yield  # pragma: no cover

    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), services=[broken])
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    replies: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        replies.append(message)

    await middleware({"type": "lifespan"}, inbox.get, send)
    assert replies == [{"type": "lifespan.startup.failed", "message": "service could not start"}]
    assert background_tasks() == []
    assert not middleware.background.running


async def test_services_run_for_the_servers_lifetime() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def service() -> AsyncIterator[None]:
        log.append("enter")
        yield
        log.append("exit")

    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), services=[service])
    async with LifespanManager(middleware):
        assert log == ["enter"]
    assert log == ["enter", "exit"]


async def test_failed_lazy_start_is_503_not_500() -> None:
    @asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise RuntimeError("service could not start")
        yield  # pragma: no cover

    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), services=[broken])
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/mcp", json=INIT)
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "Server is not ready; retry shortly"
    assert background_tasks() == []


class _Cycle:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


async def test_the_startup_heap_is_frozen_while_the_middleware_runs() -> None:
    """``frozen_startup_heap``: what exists at startup is skipped by collections while the
    middleware runs (garbage made at startup is collected first, never frozen); what requests
    make later is collected as usual; stopping unfreezes it all."""
    gc.disable()  # nothing is collected but by the service (and the test)
    try:
        garbage_at_startup = weakref.ref(_Cycle())
        kept_from_startup = [_Cycle()]
        middleware = MCPSessionMiddleware(
            HostApp(), mcp_app=RecordingMCPApp(), services=[frozen_startup_heap]
        )
        async with LifespanManager(middleware):
            assert gc.get_freeze_count() > 0
            assert garbage_at_startup() is None  # collected before the freeze
            assert not any(item is kept_from_startup for item in gc.get_objects())  # frozen
            made_later = weakref.ref(_Cycle())
            gc.collect()
            assert made_later() is None
    finally:
        gc.enable()
    assert gc.get_freeze_count() == 0
    assert any(item is kept_from_startup for item in gc.get_objects())


async def test_the_heap_stays_frozen_until_the_last_app_with_the_service_stops() -> None:
    def app() -> MCPSessionMiddleware:
        return MCPSessionMiddleware(
            HostApp(), mcp_app=RecordingMCPApp(), services=[frozen_startup_heap]
        )

    first, second = app(), app()
    async with LifespanManager(first):
        async with LifespanManager(second):
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the first one still runs
    assert gc.get_freeze_count() == 0


async def test_a_freeze_made_by_someone_else_is_left_to_its_owner() -> None:
    """A pre-fork server froze its heap before the app started: stopping the app keeps it."""
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        middleware = MCPSessionMiddleware(
            HostApp(), mcp_app=RecordingMCPApp(), services=[frozen_startup_heap]
        )
        async with LifespanManager(middleware):
            pass
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


async def test_readiness_follows_the_background_task() -> None:
    """Ready once started; not ready as soon as it is told to stop or its task ends some other
    way (a host cancelling it); a later start brings it back."""
    runner = BackgroundRunner(SessionRegistry(), cleanup_interval=60)
    assert not runner.ready
    await runner.start()
    assert runner.ready
    task = runner._task
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not runner.ready
    await runner.start()
    assert runner.ready
    stopping = asyncio.ensure_future(runner.stop())
    await asyncio.sleep(0)
    assert not runner.ready  # at once, before the services are down
    await stopping
    assert not runner.ready


class _LogAfterStart:
    """Stands in for the background module's logger: runs ``then`` when the task says it has
    started (right after it became ready)."""

    def __init__(self, then: Any) -> None:
        self.then = then

    def debug(self, message: str, **fields: Any) -> None:
        if "started" in message:
            self.then()

    def exception(self, message: str, **fields: Any) -> None:
        pass


async def test_a_task_that_dies_right_after_starting_is_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail() -> None:
        raise RuntimeError("a log processor failed")

    monkeypatch.setattr(background_module, "logger", _LogAfterStart(fail))
    runner = BackgroundRunner(SessionRegistry(), cleanup_interval=60)
    await runner.start()
    task = runner._task
    assert task is not None
    with pytest.raises(RuntimeError):
        await task
    assert not runner.ready  # so the next request starts it again


async def test_a_start_whose_caller_is_cancelled_keeps_the_running_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The services came up as the caller of ``start()`` was cancelled: the running task is
    kept (not forgotten, to be started twice, and never stopped)."""
    exits: list[str] = []

    @asynccontextmanager
    async def service() -> AsyncIterator[None]:
        try:
            yield
        finally:
            exits.append("exit")

    caller: asyncio.Future[None] | None = None

    def cancel_caller() -> None:
        assert caller is not None
        caller.cancel()

    monkeypatch.setattr(background_module, "logger", _LogAfterStart(cancel_caller))
    runner = BackgroundRunner(SessionRegistry(), cleanup_interval=60, services=[service])
    caller = asyncio.ensure_future(runner.start())
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert runner.ready
    assert len(background_tasks()) == 2  # one runner (and its cleanup loop), not two
    await runner.stop()
    assert exits == ["exit"]
    assert background_tasks() == []


async def test_a_stop_ends_a_sweep_that_swallowed_a_cancellation() -> None:
    """A sweep whose store call turned the stop's cancellation into an outage (as redis-py's
    read timeout firing with it did) went on sweeping, and the stop waited for good."""
    registry = SessionRegistry()
    sweeping = asyncio.Event()
    swallowed: list[int] = []

    async def sweep(*args: Any, **kwargs: Any) -> int:
        sweeping.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(1)
            raise StoreUnavailable("read timed out") from None
        return 0

    async def at_once(seconds: float) -> None:
        return None

    registry.sweep = sweep  # type: ignore[method-assign]
    runner = BackgroundRunner(registry, cleanup_interval=60, sleep=at_once)
    await runner.start()
    await asyncio.wait_for(sweeping.wait(), 10)
    stop = asyncio.ensure_future(runner.stop())
    done, _ = await asyncio.wait({stop}, timeout=10)
    assert stop in done and swallowed == [1]
