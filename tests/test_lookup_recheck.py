"""Lookups that trust the store's recent word: with Redis, a process that follows the store's
notices does not read a session it holds again within ``recheck`` seconds; every end and every
handshake change still reaches it at once (a real redis-server, two registries)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.events import SessionEvent, SessionEventKind
from mcp2anp_middleware.sessions.middleware import HANDSHAKE_RESERVATION
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.state import NEVER, SessionState
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

ALICE = SessionConfig(principal="alice")
BOB = SessionConfig(principal="bob")


class CountingStore(RedisSessionStore):
    """The real Redis store, counting its reads; a read can be held at a gate."""

    reads = 0
    gate: asyncio.Event | None = None
    reading: asyncio.Event | None = None

    async def read(self, session_id: str) -> Any:
        self.reads += 1
        found = await super().read(session_id)
        if self.gate is not None and self.reading is not None:
            self.reading.set()
            await self.gate.wait()
        return found


@asynccontextmanager
async def two_workers(
    redis_server: RedisServer, prefix: str, clock: ManualClock, *, follow_b: bool = True
) -> AsyncIterator[tuple[SessionRegistry, SessionRegistry, CountingStore]]:
    """Workers A and B on one Redis; B follows the store's notices (until subscribed)."""
    store_a = CountingStore.from_url(redis_server.url, prefix=prefix)
    store_b = CountingStore.from_url(redis_server.url, prefix=prefix)
    worker_a = SessionRegistry(store=store_a, session_timeout=60.0, clock=clock)
    worker_b = SessionRegistry(store=store_b, session_timeout=60.0, clock=clock)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(store_a.aclose)
        stack.push_async_callback(store_b.aclose)
        if follow_b:
            await stack.enter_async_context(worker_b.follow_other_processes())
            await _following(worker_b)
        yield worker_a, worker_b, store_b


async def made_on(worker: SessionRegistry) -> SessionState:
    """A new session of alice's, registered by ``worker``."""
    state = worker.new_session(ALICE)
    await worker.register(state)
    return state


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds: a notice crossed Redis (bounded, so a missing one fails)."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (set by another connection's pub/sub reader)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


async def _following(worker: SessionRegistry) -> None:
    """Until the worker's subscription is confirmed by Redis (it connects on its own)."""
    await until(lambda: worker.following)


async def _event(worker: SessionRegistry, kind: SessionEventKind, session_id: str) -> None:
    seen = asyncio.Event()

    def on_event(event: SessionEvent) -> None:
        if event.kind is kind and event.session_id == session_id:
            seen.set()

    unsubscribe = worker.subscribe(on_event)
    try:
        await asyncio.wait_for(seen.wait(), 10)
    finally:
        unsubscribe()


async def test_a_held_session_is_read_once_per_recheck(redis_server: RedisServer) -> None:
    clock = ManualClock()
    async with two_workers(redis_server, "recheck1:", clock) as (worker_a, worker_b, store_b):
        state = await made_on(worker_a)
        first = await worker_b.get(state.session_id, ALICE)
        assert first is not None and store_b.reads == 1
        for _ in range(5):  # within recheck: no read, the same object
            assert await worker_b.get(state.session_id, ALICE) is first
        assert store_b.reads == 1
        assert await worker_b.get(state.session_id, BOB) is None  # still bound to alice
        clock.advance(store_b.recheck)
        assert await worker_b.get(state.session_id, ALICE) is first
        assert store_b.reads == 3  # BOB's lookup read; the one after recheck read again


async def test_a_delete_elsewhere_is_refused_at_once_within_recheck(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    async with two_workers(redis_server, "recheck2:", clock) as (worker_a, worker_b, _):
        state = await made_on(worker_a)
        assert await worker_b.get(state.session_id, ALICE) is not None
        ended = asyncio.create_task(_event(worker_b, SessionEventKind.DELETED, state.session_id))
        await asyncio.sleep(0)  # subscribed before the delete
        assert await worker_a.remove(state.session_id, reason="deleted")
        await ended
        assert await worker_b.get(state.session_id, ALICE) is None


async def test_a_handshake_change_elsewhere_is_read_at_the_next_lookup(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    async with two_workers(redis_server, "recheck3:", clock) as (worker_a, worker_b, store_b):
        state = await made_on(worker_a)
        await worker_a.save_handshake(state, '{"v":1}')
        in_b = await worker_b.get(state.session_id, ALICE)
        assert in_b is not None and in_b.handshake == '{"v":1}'
        await worker_a.save_handshake(state, '{"v":2}')
        await until(lambda: in_b.confirmed_at == NEVER)  # the "changed" notice came
        assert (await worker_b.get(state.session_id, ALICE)) is in_b
        assert in_b.handshake == '{"v":2}'
        assert store_b.reads == 2


async def test_a_notice_during_a_read_leaves_the_result_unconfirmed(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    async with two_workers(redis_server, "recheck4:", clock) as (worker_a, worker_b, store_b):
        state, other = await made_on(worker_a), await made_on(worker_a)
        store_b.gate, store_b.reading = asyncio.Event(), asyncio.Event()
        lookup = asyncio.create_task(worker_b.get(state.session_id, ALICE))
        await asyncio.wait_for(store_b.reading.wait(), 10)
        noticed = worker_b._notices
        assert await worker_a.remove(other.session_id, reason="deleted")  # any notice will do
        await until(lambda: worker_b._notices != noticed)
        store_b.gate.set()
        found = await lookup
        assert found is not None and found.confirmed_at == NEVER
        store_b.gate = None
        assert await worker_b.get(state.session_id, ALICE) is found
        assert store_b.reads == 2  # not trusted: read again


async def test_without_following_every_lookup_reads(redis_server: RedisServer) -> None:
    clock = ManualClock()
    async with two_workers(redis_server, "recheck5:", clock, follow_b=False) as (
        worker_a,
        worker_b,
        store_b,
    ):
        state = await made_on(worker_a)
        for _ in range(3):
            assert await worker_b.get(state.session_id, ALICE) is not None
        assert store_b.reads == 3


async def test_a_new_subscription_forgets_earlier_confirmations(redis_server: RedisServer) -> None:
    """Notices sent while the subscription was down are lost: once it is back, every session
    is read again before it is trusted."""
    clock = ManualClock()
    async with two_workers(redis_server, "recheck6:", clock) as (worker_a, worker_b, store_b):
        state = await made_on(worker_a)
        in_b = await worker_b.get(state.session_id, ALICE)
        assert in_b is not None and in_b.confirmed_at != NEVER
        killer = RedisSessionStore.from_url(redis_server.url, prefix="recheck6:").client
        await killer.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await killer.aclose()
        await until(lambda: not worker_b.following)
        await until(lambda: worker_b.following)  # subscribed again
        assert in_b.confirmed_at == NEVER
        reads = store_b.reads
        assert await worker_b.get(state.session_id, ALICE) is in_b
        assert store_b.reads == reads + 1


async def test_a_committed_session_is_confirmed_by_its_commit(redis_server: RedisServer) -> None:
    """The commit that ends an ``initialize`` is the store's word on the session, as a read is:
    the session's next request (``notifications/initialized``) does not read it again."""
    clock = ManualClock()
    async with two_workers(redis_server, "recheck7:", clock) as (_, worker_b, store_b):
        state = worker_b.new_session(ALICE)
        await worker_b.register(state, reservation=HANDSHAKE_RESERVATION)
        await worker_b.commit(state)
        assert await worker_b.get(state.session_id, ALICE) is state
        assert store_b.reads == 0
        clock.advance(store_b.recheck)
        assert await worker_b.get(state.session_id, ALICE) is state
        assert store_b.reads == 1


async def test_a_delete_is_removed_and_announced_in_one_step(redis_server: RedisServer) -> None:
    """One script removes the session and tells the other processes: no second round trip."""
    clock = ManualClock()
    async with two_workers(redis_server, "recheck8:", clock) as (worker_a, worker_b, _):
        state = await made_on(worker_a)
        assert await worker_b.get(state.session_id, ALICE) is not None
        announced: list[str] = []

        async def announce_ended(notice: str) -> None:
            announced.append(notice)

        worker_a.store.announce_ended = announce_ended  # type: ignore[attr-defined]
        ended = asyncio.create_task(_event(worker_b, SessionEventKind.DELETED, state.session_id))
        await asyncio.sleep(0)  # subscribed before the delete
        assert await worker_a.remove(state.session_id, reason="deleted")
        await ended  # the notice came from the script
        assert announced == []
        assert not await worker_a.remove(state.session_id, reason="deleted")  # gone: no notice


async def test_a_lookup_that_read_nothing_leaves_a_session_made_during_its_read(
    redis_server: RedisServer,
) -> None:
    """A read that found no record says nothing of a live object made for the id while the read
    was on its way: a principal's session-less-era session, made by one request while another
    request's lookup read, stays with the request it serves (before, the late lookup ended it,
    which cancelled that request, and made a second object for the same session)."""
    clock = ManualClock()
    async with two_workers(redis_server, "recheck9:", clock, follow_b=False) as (_, worker, store):
        carol = SessionConfig(principal="carol")
        gate = store.gate = asyncio.Event()
        store.reading = asyncio.Event()
        late = asyncio.create_task(worker.implicit_session(carol))
        await asyncio.wait_for(store.reading.wait(), 10)
        store.gate = None
        state, created = await worker.implicit_session(carol)
        assert created
        await worker.acquire(state)
        gate.set()
        other, other_created = await late
        assert not state.closed
        assert other is state and not other_created
        await worker.commit(state)
        await worker.release(state)
        assert await worker.get(state.session_id, carol, implicit=True) is state


@pytest.mark.parametrize("finished", [False, True])
async def test_a_sweep_leaves_a_session_a_request_took_up_during_its_reads(
    redis_server: RedisServer, finished: bool
) -> None:
    """A sweep reads its candidates one at a time: a request that takes one up meanwhile keeps
    it, running or finished by then (before, the sweep closed it, under the request when it still
    ran, which cancelled it)."""
    clock = ManualClock()
    store_a = CountingStore.from_url(
        redis_server.url, prefix=f"recheck10{finished}:", touch_interval=1.0
    )
    store_b = RedisSessionStore.from_url(
        redis_server.url, prefix=f"recheck10{finished}:", touch_interval=1.0
    )
    worker_a = SessionRegistry(store=store_a, session_timeout=10.0, clock=clock)
    worker_b = SessionRegistry(store=store_b, session_timeout=10.0, clock=clock)
    closed: list[str] = []
    worker_a.subscribe(lambda event: closed.append(event.session_id))
    try:
        made = [await made_on(worker_b) for _ in range(2)]
        held = [await worker_a.get(state.session_id, ALICE) for state in made]
        for _ in range(6):  # A's objects idle past the timeout while B keeps the sessions used
            clock.advance(5)
            for state in made:
                await worker_b.acquire(state)
                await worker_b.release(state)
        gate = store_a.gate = asyncio.Event()
        store_a.reading = asyncio.Event()
        sweeping = asyncio.create_task(worker_a.sweep())
        await asyncio.wait_for(store_a.reading.wait(), 10)  # reading the first candidate
        store_a.gate = None
        taken = await worker_a.get(made[1].session_id, ALICE)
        assert taken is not None and taken is held[1]
        await worker_a.acquire(taken)
        if finished:
            await worker_a.release(taken)
        gate.set()
        await sweeping
        assert closed == [made[0].session_id]  # no longer needed here: used on B
        assert held[0] is not None and held[0].closed
        assert not taken.closed and taken.in_flight == (0 if finished else 1)
        if not finished:
            await worker_a.release(taken)
        assert await worker_a.get(made[1].session_id, ALICE) is taken
    finally:
        await store_a.aclose()
        await store_b.aclose()
