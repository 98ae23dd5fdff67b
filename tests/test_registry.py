"""The session registry over every store: expiry, sharing between processes, events, and
per-principal listing and revocation. Two registries over one store behave like two workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.events import SessionEvent, SessionEventKind
from mcp2anp_middleware.sessions.ids import short_id
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.state import SessionState
from mcp2anp_middleware.sessions.state_file import save_state_file
from mcp2anp_middleware.sessions.stores import (
    InMemorySessionStore,
    SessionGone,
    SessionStore,
    StoreUnavailable,
    UnconfirmedCommit,
)
from mcp2anp_middleware.sessions.stores.base import CapExceeded, Caps, SessionRecord
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .redis_server import RedisServer
from .store_fixture import StoreFactory, new_store

pytestmark = pytest.mark.anyio
__all__ = ["new_store"]  # the fixture, used by name

ALICE = SessionConfig(principal="alice")
BOB = SessionConfig(principal="bob")
TIMEOUT = 60.0


def registry(store: SessionStore, clock: ManualClock, **options: Any) -> SessionRegistry:
    return SessionRegistry(store=store, clock=clock, session_timeout=TIMEOUT, **options)


def recorder(sessions: SessionRegistry) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    sessions.subscribe(events.append)
    return events


async def test_registry_expiry_by_clock(new_store: StoreFactory) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    clock.advance(TIMEOUT - 1)
    assert await sessions.get(state.session_id, ALICE) is state
    await sessions.acquire(state)
    await sessions.release(state)
    clock.advance(TIMEOUT - 1)
    assert await sessions.get(state.session_id, ALICE) is not None
    # gone once idle past the timeout plus the store's touch tolerance (0 in memory)
    clock.advance(2 + sessions.touch_interval)
    assert await sessions.get(state.session_id, ALICE) is None


async def test_registry_hides_other_principals_sessions(new_store: StoreFactory) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    assert await sessions.get(state.session_id, BOB) is None
    assert await sessions.get(state.session_id, ALICE) is state


async def test_session_is_shared_between_processes(new_store: StoreFactory) -> None:
    clock = ManualClock()
    worker_a, worker_b = registry(new_store(), clock), registry(new_store(), clock)
    state = worker_a.new_session(ALICE)
    await worker_a.register(state)
    seen_by_b = await worker_b.get(state.session_id, ALICE)
    assert seen_by_b is not None and seen_by_b.session_id == state.session_id
    assert seen_by_b.created_at == state.created_at
    assert await worker_b.remove(state.session_id, reason="deleted")
    assert await worker_a.get(state.session_id, ALICE) is None
    assert state.closed  # A released its live objects too


async def test_implicit_session_is_one_per_principal_everywhere(new_store: StoreFactory) -> None:
    clock = ManualClock()
    worker_a, worker_b = registry(new_store(), clock), registry(new_store(), clock)
    found = await asyncio.gather(
        worker_a.implicit_session(ALICE),
        worker_b.implicit_session(ALICE),
        worker_a.implicit_session(ALICE),
    )
    states = [state for state, _ in found]
    assert len({s.session_id for s in states}) == 1
    assert [created for _, created in found].count(True) == 1  # one creator commits or discards
    bob, _ = await worker_b.implicit_session(BOB)
    assert bob.session_id != states[0].session_id
    # an implicit session is not reachable as an explicit (handshake-era) session id
    assert await worker_a.get(states[0].session_id, ALICE) is None


async def test_in_flight_session_survives_expiry(new_store: StoreFactory) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    await sessions.acquire(state)
    for _ in range(3):  # a long request: the sweep renews its lease each interval
        clock.advance(TIMEOUT - 1)
        await sessions.sweep()
    assert await sessions.get(state.session_id, ALICE) is state
    await sessions.release(state)
    clock.advance(TIMEOUT - 1)  # idle time counts from the end of the request
    assert await sessions.get(state.session_id, ALICE) is state


async def test_redis_writes_are_throttled(redis_server: RedisServer) -> None:
    clock = ManualClock()
    store = RedisSessionStore.from_url(redis_server.url, prefix="throttle:", touch_interval=10.0)
    writes = 0
    original = store.write

    async def counting_write(*args: Any, **kwargs: Any) -> bool:
        nonlocal writes
        writes += 1
        return await original(*args, **kwargs)

    store.write = counting_write  # type: ignore[method-assign]
    sessions = registry(store, clock)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    for _ in range(9):  # nine requests, one second apart: within one touch interval
        clock.advance(1)
        await sessions.acquire(state)
        await sessions.release(state)
    assert writes == 0
    clock.advance(2)
    await sessions.acquire(state)
    await sessions.release(state)
    assert writes == 1
    await store.aclose()


async def test_busy_session_does_not_hide_expired_ones_from_the_sweep(
    new_store: StoreFactory,
) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock)
    busy = sessions.new_session(ALICE)
    await sessions.register(busy)
    clock.advance(10)
    idle = sessions.new_session(BOB)
    await sessions.register(idle)
    clock.advance(10)
    await sessions.acquire(busy)
    clock.advance(TIMEOUT - 5 + sessions.touch_interval)  # idle: past timeout and tolerance
    await sessions.sweep()
    assert idle.session_id not in sessions
    assert await sessions.get(idle.session_id, BOB) is None
    assert await sessions.get(busy.session_id, ALICE) is busy
    await sessions.release(busy)


async def test_a_stale_local_copy_does_not_remove_a_newer_session(new_store: StoreFactory) -> None:
    """Implicit ids repeat per principal: process A's copy of an old session must not be taken
    for the new one process B created after it expired."""
    clock = ManualClock()
    worker_a = registry(new_store(), clock, max_session_age=TIMEOUT + 5)
    worker_b = registry(new_store(), clock, max_session_age=TIMEOUT + 5)
    old, _ = await worker_a.implicit_session(ALICE)
    clock.advance(TIMEOUT + worker_a.touch_interval + 1)
    new, _ = await worker_b.implicit_session(ALICE)  # the old one expired: B makes a new one
    assert new.created_at == clock()
    clock.advance(1)
    seen_by_a, _ = await worker_a.implicit_session(ALICE)
    assert seen_by_a.created_at == new.created_at
    assert old.closed and old is not seen_by_a
    assert await worker_b.get(new.session_id, ALICE, implicit=True) is not None


async def test_lifecycle_events(new_store: StoreFactory) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock, per_principal_cap=1, evict_oldest=True)
    events = recorder(sessions)
    first = sessions.new_session(ALICE)
    await sessions.register(first)
    await sessions.commit(first)
    second = sessions.new_session(ALICE)
    await sessions.register(second)  # at the cap: evicts the first
    await sessions.commit(second)
    await sessions.remove(second.session_id, reason="deleted")
    third = sessions.new_session(BOB)
    await sessions.register(third)
    await sessions.commit(third)
    clock.advance(TIMEOUT + sessions.touch_interval + 1)
    await sessions.sweep()
    kinds = [(e.kind, e.short_id, e.state) for e in events]
    assert kinds == [
        (SessionEventKind.CREATED, first.session_id[:8] + "…", first),
        (SessionEventKind.EVICTED, first.session_id[:8] + "…", first),
        (SessionEventKind.CREATED, second.session_id[:8] + "…", second),
        (SessionEventKind.DELETED, second.session_id[:8] + "…", second),
        (SessionEventKind.CREATED, third.session_id[:8] + "…", third),
        (SessionEventKind.EXPIRED, third.session_id[:8] + "…", third),
    ]
    assert first.closed and second.closed and third.closed
    fourth = sessions.new_session(BOB)
    await sessions.register(fourth)
    await sessions.close_local()
    assert events[-1].kind is SessionEventKind.CLOSED and events[-1].state is fourth


async def test_a_failing_listener_does_not_stop_the_others(new_store: StoreFactory) -> None:
    sessions = registry(new_store(), ManualClock())

    def broken(event: SessionEvent) -> None:
        raise RuntimeError("listener bug")

    sessions.subscribe(broken)
    events = recorder(sessions)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    await sessions.commit(state)
    assert [e.kind for e in events] == [SessionEventKind.CREATED]


async def test_list_and_revoke_a_principals_sessions_across_processes(
    new_store: StoreFactory,
) -> None:
    clock = ManualClock()
    worker_a, worker_b = registry(new_store(), clock), registry(new_store(), clock)
    mine = []
    for worker in (worker_a, worker_b, worker_a):
        state = worker.new_session(ALICE)
        await worker.register(state)
        mine.append(state)
        clock.advance(1)
    bobs = worker_b.new_session(BOB)
    await worker_b.register(bobs)
    listed = await worker_b.sessions_of("alice")
    assert [s.short_id for s in listed] == [m.session_id[:8] + "…" for m in mine]
    assert all(s.principal == "alice" and s.expires_at == s.last_used + TIMEOUT for s in listed)
    assert all(m.session_id not in str(s.as_dict()) for s in listed for m in mine)

    events = recorder(worker_a)
    assert await worker_b.revoke_principal("alice") == 3
    assert await worker_b.sessions_of("alice") == []
    for state in mine:  # every worker refuses them at their next request
        assert await worker_a.get(state.session_id, ALICE) is None
        assert await worker_b.get(state.session_id, ALICE) is None
    assert all(state.closed for state in mine)
    assert {e.kind for e in events} <= {SessionEventKind.REVOKED, SessionEventKind.EXPIRED}
    assert await worker_a.get(bobs.session_id, BOB) is not None


async def test_other_processes_drop_live_objects_when_told(redis_server: RedisServer) -> None:
    """With Redis, a DELETE on one worker closes the session's live object on the others at
    once (pub/sub), not only at their next lookup."""
    clock = ManualClock()
    prefix = "follow:"
    store_a = RedisSessionStore.from_url(redis_server.url, prefix=prefix)
    store_b = RedisSessionStore.from_url(redis_server.url, prefix=prefix)
    worker_a, worker_b = registry(store_a, clock), registry(store_b, clock)
    state = worker_a.new_session(ALICE)
    await worker_a.register(state)
    copy_in_b = await worker_b.get(state.session_id, ALICE)
    assert copy_in_b is not None
    ended = asyncio.Event()
    seen: list[SessionEvent] = []

    def on_event(event: SessionEvent) -> None:
        seen.append(event)
        ended.set()

    worker_b.subscribe(on_event)
    async with worker_b.follow_other_processes():
        await asyncio.wait_for(_subscribed(store_b), 10)
        assert await worker_a.remove(state.session_id, reason="deleted")
        await asyncio.wait_for(ended.wait(), 10)
    assert copy_in_b.closed and state.session_id not in worker_b
    assert seen[0].kind is SessionEventKind.DELETED and seen[0].state is copy_in_b
    await store_a.aclose()
    await store_b.aclose()


async def _subscribed(store: RedisSessionStore) -> None:
    """Until the follower's subscription is registered with Redis (it connects on its own)."""
    while True:
        subscribers = await store.client.pubsub_numsub(store.ended_channel)
        if subscribers and int(subscribers[0][1]) > 0:
            return
        await asyncio.sleep(0.01)


async def test_a_session_busy_on_one_worker_is_not_expired_by_another(
    new_store: StoreFactory,
) -> None:
    """Worker A holds a long request (an SSE stream) past the idle timeout; its sweep renews the
    lease. Worker B, with no request on the session, must not take it for expired."""
    clock = ManualClock()
    worker_a, worker_b = registry(new_store(), clock), registry(new_store(), clock)
    state = worker_a.new_session(ALICE)
    await worker_a.register(state)
    await worker_a.acquire(state)
    for _ in range(3):
        clock.advance(TIMEOUT - 1)
        await worker_a.sweep()
    seen_by_b = await worker_b.get(state.session_id, ALICE)
    assert seen_by_b is not None and not seen_by_b.in_flight
    await worker_a.release(state)  # the idle deadline is written again at the end
    clock.advance(TIMEOUT + worker_a.touch_interval + 1)
    assert await worker_b.get(state.session_id, ALICE) is None


async def test_a_new_implicit_session_keeps_its_in_flight_mark(new_store: StoreFactory) -> None:
    """Implicit ids repeat: a request of a revoked implicit session ending must not clear the
    in-flight mark of the new session with the same id."""
    clock = ManualClock()
    sessions = registry(new_store(), clock)
    old, _ = await sessions.implicit_session(ALICE)
    await sessions.acquire(old)
    await sessions.revoke(old.session_id)
    new, created = await sessions.implicit_session(ALICE)
    assert created and new is not old
    await sessions.acquire(new)
    assert sessions.in_flight == 2
    await sessions.release(old)
    assert sessions.in_flight == 1 and not await sessions.wait_idle(0)
    await sessions.release(new)
    assert sessions.in_flight == 0


async def test_a_cap_counts_no_session_past_its_deadline(new_store: StoreFactory) -> None:
    """A principal at its cap whose session has expired, but not been swept yet, may open a new
    one: the memory store expires before refusing (Redis trims its index itself)."""
    clock = ManualClock()
    sessions = registry(new_store(), clock, per_principal_cap=1)
    first = sessions.new_session(ALICE)
    await sessions.register(first)
    clock.advance(2 * TIMEOUT + sessions.touch_interval)
    second = sessions.new_session(ALICE)
    await sessions.register(second)  # no CapExceeded
    assert await sessions.get(second.session_id, ALICE) is second


class GatedStore(InMemorySessionStore):
    """The memory store with writes that suspend until the test lets them through: a store
    whose writes take a while (Redis), with the timing in the test's hands."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.writing = asyncio.Event()
        self.proceed = asyncio.Event()

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        if self.gated:
            self.writing.set()
            await self.proceed.wait()
        return await super().write(record, ttl=ttl, now=now)


@pytest.mark.parametrize("suspending", [True, False])
async def test_a_cancelled_request_still_ends_its_use_of_the_session(suspending: bool) -> None:
    """The request's task is cancelled (its anyio scope, as a host's timeout does) and then
    ends its use: the write of its end reaches the store all the same. A store whose writes
    suspend gets it shielded; the memory store's writes never suspend, so none can be cut."""
    clock = ManualClock()
    store = GatedStore() if suspending else InMemorySessionStore()
    sessions = registry(store, clock, touch_interval=0)
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    await sessions.commit(state)
    await sessions.acquire(state)
    clock.advance(5)
    request = anyio.CancelScope()

    async def serve() -> None:
        with request:
            try:
                await asyncio.Event().wait()  # the request runs until cancelled
            finally:
                await sessions.release(state)

    task = asyncio.ensure_future(serve())
    await asyncio.sleep(0)
    if isinstance(store, GatedStore):
        store.gated = True
    request.cancel()
    if isinstance(store, GatedStore):
        await store.writing.wait()
        request.cancel()  # cancelled again while the write is on its way
        await asyncio.sleep(0)
        store.proceed.set()
    await task
    record = await store.read(state.session_id)
    assert record is not None and record.last_used == clock()
    assert sessions.in_flight == 0


async def created(sessions: SessionRegistry) -> SessionState:
    """A session of ALICE's, created and committed as a served ``initialize`` leaves it."""
    state = sessions.new_session(ALICE)
    await sessions.register(state)
    await sessions.commit(state)
    return state


class CountingMemoryStore(InMemorySessionStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def read(self, session_id: str) -> SessionRecord | None:
        self.reads += 1
        return await super().read(session_id)


async def test_a_memory_store_of_one_registry_is_not_read_for_the_sessions_it_holds() -> None:
    clock = ManualClock()
    store = CountingMemoryStore()
    sessions = registry(store, clock)
    state = await created(sessions)
    for _ in range(3):
        assert await sessions.get(state.session_id, ALICE) is state
    assert store.reads == 0
    assert await sessions.get(state.session_id, BOB) is None  # another principal: still refused
    clock.advance(TIMEOUT + 1)
    assert await sessions.get(state.session_id, ALICE) is None  # past its deadline: refused
    # A second registry over the same store (another app in this process) could change what
    # the first holds: from then on both read the store.
    other = registry(store, clock)
    fresh = await created(sessions)
    reads = store.reads
    assert await other.remove(fresh.session_id, reason="deleted")
    assert await sessions.get(fresh.session_id, ALICE) is None
    assert store.reads > reads
    # Even once the other registry is gone: what it changed, the first one never heard of.
    held = await created(sessions)
    assert await registry(store, clock).revoke(held.session_id)
    gc.collect()
    assert await sessions.get(held.session_id, ALICE) is None


async def test_a_request_on_a_memory_store_of_one_registry_is_written_once(tmp_path: Path) -> None:
    """While the record written at the end of the last request outlives a lease, the start of
    the next writes nothing (its end does), yet makes the session its principal's most recently
    used: a principal at its cap loses another session, not the busy one. A record closer to its
    end than a lease is written at the start as well."""
    clock = ManualClock()
    store = InMemorySessionStore()
    sessions = registry(store, clock, per_principal_cap=2, evict_oldest=True, lease=10.0)

    def last_used(state: SessionState) -> float:
        (record,) = (r for r in store.records() if r.session_id == state.session_id)
        return record.last_used

    busy = await created(sessions)
    other = await created(sessions)
    clock.advance(1)
    await sessions.acquire(busy)
    assert last_used(busy) == busy.created_at  # not written at the start
    # what the process shows and saves of it is its live use all the same
    shown = {i.short_id: i for i in await sessions.sessions_of(ALICE.principal)}
    assert shown[short_id(busy.session_id)].last_used == clock()
    assert shown[short_id(busy.session_id)].expires_at == clock() + TIMEOUT
    saved = tmp_path / "state.json"
    await save_state_file(sessions, saved)
    by_id = {s["id"]: s for s in json.loads(saved.read_text())["sessions"]}
    assert by_id[busy.session_id]["last_accessed"] == clock()
    await created(sessions)  # the cap evicts the least recently used: not the busy one
    assert other.closed and not busy.closed
    await sessions.release(busy)
    assert last_used(busy) == clock()
    clock.advance(TIMEOUT - 5)  # 5 s left in the record: less than a lease
    await sessions.acquire(busy)
    assert last_used(busy) == clock()
    await sessions.release(busy)


def test_a_store_with_writes_of_its_own_is_not_written_in_place() -> None:
    """The registry writes the memory store directly (``write_now``) only while both of its
    writes are the memory store's own: a subclass overriding either is written through
    ``write``, in order."""

    class OwnWrite(InMemorySessionStore):
        async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
            return await super().write(record, ttl=ttl, now=now)

    class OwnWriteNow(InMemorySessionStore):
        def write_now(self, record: SessionRecord) -> bool:
            return super().write_now(record)

    assert InMemorySessionStore().writes_in_place
    assert not OwnWrite().writes_in_place
    assert not OwnWriteNow().writes_in_place


async def test_a_memory_store_with_a_touch_interval_is_written_at_most_that_often() -> None:
    clock = ManualClock()
    store = InMemorySessionStore()
    sessions = registry(store, clock, touch_interval=5.0)

    def last_used(state: SessionState) -> float:
        (record,) = (r for r in store.records() if r.session_id == state.session_id)
        return record.last_used

    state = await created(sessions)
    written = last_used(state)
    clock.advance(1)
    await sessions.acquire(state)
    await sessions.release(state)
    assert last_used(state) == written  # used within the touch interval: not written
    clock.advance(5)
    await sessions.acquire(state)
    await sessions.release(state)
    assert last_used(state) == clock()


class CountingStore(InMemorySessionStore):
    """The memory store, counting its record writes (on the instance: a subclass that writes
    its own way is no longer written in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        write_now = self.write_now

        def counted(record: SessionRecord) -> bool:
            self.writes += 1
            return write_now(record)

        self.write_now = counted  # type: ignore[method-assign]


async def created_with_handshake(
    sessions: SessionRegistry, store: CountingStore
) -> tuple[SessionState, int]:
    """A session created as ``initialize`` creates one, its handshake saved and its creation
    committed; and the store's writes before the handshake and the commit."""
    state = sessions.new_session(ALICE)
    await sessions.register(state, reservation=30.0)
    await sessions.acquire(state)
    before = store.writes
    await sessions.save_handshake(state, '{"v":"2025-11-25"}')
    await sessions.commit(state)
    return state, before


@pytest.mark.parametrize("touch_interval", [None, 3600.0])
async def test_a_creation_in_a_store_of_this_process_alone_is_written_once(
    touch_interval: float | None,
) -> None:
    """Its records expire only when its registry expires them, so a reservation there extends
    nothing: the handshake goes with the write that ends the creating request (whatever the
    touch interval), and the commit writes nothing."""
    clock = ManualClock()
    store = CountingStore()
    sessions = registry(store, clock, touch_interval=touch_interval)
    state, before = await created_with_handshake(sessions, store)
    assert store.writes == before and not state.reserved
    clock.advance(1)
    await sessions.release(state)
    assert store.writes == before + 1
    record = await store.read(state.session_id)
    assert record is not None
    assert record.handshake == '{"v":"2025-11-25"}' and record.last_used == clock()
    clock.advance(1)
    await sessions.acquire(state)  # and from then on, as any session
    before = store.writes
    await sessions.release(state)
    assert store.writes == (before + 1 if touch_interval is None else before)


async def test_a_creation_in_a_shared_memory_store_is_written_by_its_commit() -> None:
    """Two registries over one memory store (two workers' view): the other one reads records,
    so the commit writes the handshake before the id is shown, as with a shared store."""
    clock = ManualClock()
    store = CountingStore()
    sessions, other = registry(store, clock), registry(store, clock)
    state, before = await created_with_handshake(sessions, store)
    assert store.writes == before + 1
    seen = await other.get(state.session_id, ALICE)
    assert seen is not None and seen.handshake == '{"v":"2025-11-25"}'
    await sessions.release(state)


@pytest.mark.parametrize("gone_by", ["revocation", "expiry"])
async def test_a_creation_gone_from_a_store_of_this_process_alone_is_not_committed(
    gone_by: str,
) -> None:
    """The commit writes nothing there, but still finds out that the record is gone (and its
    request is refused, no id handed out) as a write finds out elsewhere."""
    clock = ManualClock()
    options: dict[str, Any] = {"per_principal_cap": 1, "evict_oldest": True}
    sessions = registry(CountingStore(), clock, **options)
    events = recorder(sessions)
    state = sessions.new_session(ALICE)
    await sessions.register(state, reservation=30.0)
    await sessions.acquire(state)
    if gone_by == "revocation":
        await sessions.revoke(state.session_id)
    else:  # an initialize longer than the idle timeout: its reservation is not renewed
        clock.advance(TIMEOUT + sessions.touch_interval + 1)
        assert await sessions.sweep() == 1
    with pytest.raises(SessionGone):
        await sessions.commit(state)
    assert sessions.stats.created == 0
    assert SessionEventKind.CREATED not in [event.kind for event in events]


async def test_a_creation_evicts_only_at_its_commit(new_store: StoreFactory) -> None:
    """With ``evict_oldest``, a reservation takes no session of its principal's: refused
    (discarded), it evicts nothing; committed, it evicts the least recently used one, ended here
    and told to the subscribers. Beside one under way, a principal at its cap may not start
    another: it would hold twice its cap."""
    clock = ManualClock()
    sessions = registry(new_store(), clock, per_principal_cap=1, evict_oldest=True)
    events = recorder(sessions)
    older = await created(sessions)
    refused = sessions.new_session(ALICE)
    await sessions.register(refused, reservation=30.0)
    await sessions.discard(refused)
    new = sessions.new_session(ALICE)
    await sessions.register(new, reservation=30.0)
    assert older.session_id in sessions and not older.closed
    with pytest.raises(CapExceeded):
        await sessions.register(sessions.new_session(ALICE), reservation=30.0)
    await sessions.commit(new)
    assert older.closed and older.session_id not in sessions and not new.closed
    assert [event.kind for event in events].count(SessionEventKind.EVICTED) == 1
    assert sessions.stats.removed["evicted"] == 1


async def test_a_commit_cancelled_while_its_write_runs_still_ends_what_it_evicted() -> None:
    """Cut short by its request's scope (a host's timeout, a client gone) while the store runs
    it, the commit still completes: the store may carry it out anyway, and a session it evicted
    must not stay served here unannounced."""
    clock = ManualClock()
    store = GatedStore()
    sessions = registry(store, clock, per_principal_cap=1, evict_oldest=True)
    older = await created(sessions)
    new = sessions.new_session(ALICE)
    await sessions.register(new, reservation=30.0)
    store.gated = True
    scopes: list[anyio.CancelScope] = []

    async def commit() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await sessions.commit(new)

    task = asyncio.ensure_future(commit())
    await asyncio.wait_for(store.writing.wait(), 5)
    scopes[0].cancel()
    store.proceed.set()
    await asyncio.wait_for(task, 5)
    assert older.closed and older.session_id not in sessions
    assert sessions.stats.removed["evicted"] == 1 and sessions.stats.created == 2
    assert [r.session_id for r in store.records()] == [new.session_id]


async def test_a_commit_its_replicas_did_not_confirm_still_ends_what_it_evicted(
    redis_server: RedisServer,
) -> None:
    """Refused as an outage (no replica confirmed it), the commit ran all the same: the
    sessions it evicted are gone, so they are ended here and counted."""
    store = RedisSessionStore.from_url(
        redis_server.url, prefix=f"unconfirmed-{time.time_ns()}:", wait_timeout=0.001
    )
    sessions = registry(store, ManualClock(), per_principal_cap=1, evict_oldest=True)
    events = recorder(sessions)
    older = await created(sessions)
    new = sessions.new_session(ALICE)
    await sessions.register(new, reservation=30.0)
    try:
        store.wait_replicas = 1  # a replica that never answers (there is none)
        with pytest.raises(UnconfirmedCommit):
            await sessions.commit(new)
        assert older.closed and older.session_id not in sessions
        assert sessions.stats.removed["evicted"] == 1 and sessions.stats.created == 1  # (older)
        assert SessionEventKind.EVICTED in [event.kind for event in events]
    finally:
        await store.aclose()


def test_a_store_without_reservations_is_refused_when_the_registry_is_made() -> None:
    """A store written against the interface before reservations would fail every creation;
    it is refused at once, with what it lacks."""

    class Before(InMemorySessionStore):
        async def create(  # type: ignore[override]
            self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
        ) -> Any:
            return await super().create(record, ttl=ttl, now=now, caps=caps)

    with pytest.raises(TypeError, match="pending"):
        SessionRegistry(store=Before())  # type: ignore[arg-type]


async def test_a_sweep_ends_live_sessions_past_their_age_though_used_lately(
    new_store: StoreFactory,
) -> None:
    """A session past its maximum age that was used more recently than one that is not over
    stands behind it in the order of use; the sweep still ends it here (Redis expires the
    record by itself and reports nothing)."""
    clock = ManualClock()
    sessions = registry(new_store(), clock, max_session_age=TIMEOUT + 10)
    events = recorder(sessions)
    aged = await created(sessions)
    clock.advance(TIMEOUT)
    fresh = await created(sessions)
    clock.advance(5)
    await sessions.acquire(aged)  # used last: behind the fresh one in the order of use
    await sessions.release(aged)
    clock.advance(6)  # aged is past its maximum age; neither is idle for long
    await sessions.sweep()
    assert aged.closed and aged.session_id not in sessions
    assert not fresh.closed and fresh.session_id in sessions
    assert [event.kind for event in events].count(SessionEventKind.EXPIRED) == 1
    # (a memory store's own expiry finds it first, and cannot tell why its deadline came)
    assert sessions.stats.removed["max_age"] + sessions.stats.removed["expired"] == 1


class ReportsNoExpiry(InMemorySessionStore):
    """A store that expires records by itself and reports none of them (as Redis), whose
    reads can be made to fail."""

    failing_reads = 0

    async def expire(self, *, now: float) -> list[SessionRecord]:
        return []

    async def read(self, session_id: str) -> SessionRecord | None:
        if self.failing_reads:
            self.failing_reads -= 1
            raise StoreUnavailable("down for a moment")
        return await super().read(session_id)


async def aged_behind_a_fresh_one(
    sessions: SessionRegistry, clock: ManualClock
) -> tuple[SessionState, SessionState]:
    """A session past its maximum age but used after a fresh one (with ``TIMEOUT + 10``)."""
    aged = await created(sessions)
    clock.advance(TIMEOUT)
    fresh = await created(sessions)
    clock.advance(5)
    await sessions.acquire(aged)
    await sessions.release(aged)
    clock.advance(6)
    return aged, fresh


async def test_sessions_made_after_many_ended_are_still_found_past_their_age() -> None:
    """The heap by age is rebuilt once mostly made of ended sessions' entries; the session whose
    creation set the rebuild off is in it too."""
    clock = ManualClock()
    sessions = registry(ReportsNoExpiry(), clock, max_session_age=TIMEOUT + 10)
    for _ in range(66):  # the next creation (the aged one) sets the rebuild off
        state = await created(sessions)
        await sessions.remove(state.session_id, reason="deleted")
    assert len(sessions._by_age) == 66
    aged, fresh = await aged_behind_a_fresh_one(sessions, clock)
    assert len(sessions._by_age) == 2  # rebuilt: the aged one's entry, then the fresh one's
    await sessions.sweep()
    assert aged.closed and not fresh.closed


async def test_a_sweep_cut_short_by_the_store_finds_the_aged_sessions_again() -> None:
    clock = ManualClock()
    store = ReportsNoExpiry()
    sessions = registry(store, clock, max_session_age=TIMEOUT + 10)
    aged, fresh = await aged_behind_a_fresh_one(sessions, clock)
    store.failing_reads = 1
    with pytest.raises(StoreUnavailable):
        await sessions.sweep()
    assert not aged.closed
    await sessions.sweep()
    assert aged.closed and not fresh.closed


async def test_a_session_past_its_age_while_busy_is_found_once_idle() -> None:
    """Busy when the sweep finds it past its age, it is looked at again at the next sweep."""
    clock = ManualClock()
    sessions = registry(ReportsNoExpiry(), clock, max_session_age=TIMEOUT + 10)
    aged, fresh = await aged_behind_a_fresh_one(sessions, clock)
    sessions.stats.removed.clear()
    await sessions.acquire(aged)
    await sessions.sweep()
    assert not aged.closed
    # Its use ends without the release that would remove it at once (as when that removal's
    # store call fails): the next sweep must still find it.
    aged.in_flight -= 1
    sessions._busy.pop(id(aged), None)
    await sessions.sweep()
    assert aged.closed and not fresh.closed


async def test_a_committed_creation_is_its_principals_most_recently_used() -> None:
    """As when the commit wrote it: the session handed out just now is not the next one a cap
    evicts, though another of the principal's was used while it was being created."""
    clock = ManualClock()
    options: dict[str, Any] = {"per_principal_cap": 2, "evict_oldest": True}
    sessions = registry(CountingStore(), clock, **options)
    older = sessions.new_session(ALICE)
    await sessions.register(older)
    state = sessions.new_session(ALICE)
    await sessions.register(state, reservation=30.0)
    await sessions.acquire(state)
    await sessions.acquire(older)  # used meanwhile
    await sessions.release(older)
    await sessions.commit(state)
    await sessions.register(sessions.new_session(ALICE))  # one too many: the oldest goes
    assert state.session_id in sessions and older.session_id not in sessions
    await sessions.release(state)


async def test_a_request_before_its_creation_has_ended_has_the_handshake_written() -> None:
    """The client has the id once the commit is done: its next request may start before the
    creating request has ended, and the record has the handshake by then."""
    store = CountingStore()
    sessions = registry(store, ManualClock())
    state, before = await created_with_handshake(sessions, store)
    assert store.writes == before
    await sessions.acquire(state)  # the next request of the session
    assert store.writes == before + 1
    record = await store.read(state.session_id)
    assert record is not None and record.handshake == '{"v":"2025-11-25"}'
    await sessions.release(state)
    await sessions.release(state)


class OwnOrder(InMemorySessionStore):
    """A subclass keeping its own eviction order, written against the earlier ``mark_used``."""

    def mark_used(self, session_id: str) -> None:  # type: ignore[override]
        super().mark_used(session_id)


async def test_a_store_subclass_with_its_own_mark_used_commits_by_a_write() -> None:
    store = OwnOrder()
    sessions = registry(store, ManualClock())
    state = sessions.new_session(ALICE)
    await sessions.register(state, reservation=30.0)
    await sessions.acquire(state)
    await sessions.save_handshake(state, '{"v":"2025-11-25"}')
    await sessions.commit(state)
    record = await store.read(state.session_id)
    assert record is not None and record.handshake == '{"v":"2025-11-25"}'
    await sessions.release(state)


async def test_the_live_cache_keeps_the_most_recently_used_sessions(
    new_store: StoreFactory,
) -> None:
    clock = ManualClock()
    sessions = registry(new_store(), clock, live_cache=3)
    first, second, third = [await created(sessions) for _ in range(3)]
    await sessions.acquire(first)  # used: now the most recent
    await sessions.release(first)
    fourth = await created(sessions)
    assert [s.session_id for s in sessions.live_sessions()] == [
        third.session_id,
        first.session_id,
        fourth.session_id,
    ]  # least recently used first; the second, least recent, dropped
    assert second.closed
    rebuilt = await sessions.get(second.session_id, ALICE)  # its record is kept: built again
    assert rebuilt is not None and rebuilt is not second
    # An object a request holds is never dropped: the trim moves it to the back and stops, the
    # cache one over its size until a later session trims it.
    await sessions.acquire(first)
    kept = sessions.live_sessions()
    for other in kept[:-1]:  # the others used since: it is the oldest
        await sessions.acquire(other)
        await sessions.release(other)
    assert sessions.live_sessions()[0] is first
    fifth = await created(sessions)
    assert sessions.live_sessions()[-2:] == [fifth, first] and not first.closed
    assert len(sessions) == 4 and not any(state.closed for state in kept)
    await sessions.release(first)
    sixth = await created(sessions)
    assert len(sessions) == 3 and sessions.live_sessions()[-1] is sixth


async def test_a_sweep_lets_other_tasks_run_while_it_reports_expired_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mcp2anp_middleware.sessions.registry as registry_module
    from mcp2anp_middleware.sessions.loop_slice import LoopSlice

    # Slices of no time: the sweep yields after every session it reports.
    monkeypatch.setattr(registry_module, "LoopSlice", lambda: LoopSlice(0.0))
    clock = ManualClock()
    sessions = registry(InMemorySessionStore(batch=10_000), clock)
    for _ in range(5):
        await created(sessions)
    clock.advance(TIMEOUT + 1)
    reported: list[int] = []
    seen: list[int] = []
    sessions.subscribe(lambda event: reported.append(len(reported)))

    async def watch() -> None:
        while True:
            seen.append(len(reported))
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0)
    try:
        assert await sessions.sweep() == 5
    finally:
        watcher.cancel()
    assert {1, 2, 3, 4} <= set(seen)  # the other task ran between the reports


async def test_a_memory_store_lets_other_tasks_run_every_batch_of_expired_entries() -> None:
    store = InMemorySessionStore(batch=2)
    for index in range(6):
        record = SessionRecord(f"s{index}", "alice", created_at=0.0, last_used=0.0, expires_at=1.0)
        assert (await store.create(record, ttl=1.0, now=0.0, caps=Caps())).created
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    before = ticks
    try:
        removed = await store.expire(now=2.0)
    finally:
        ticker.cancel()
    assert len(removed) == 6 and len(store) == 0
    assert ticks - before >= 3  # at least once per two entries


async def test_a_sweep_leaves_alone_a_later_implicit_session_with_the_same_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An implicit session's id is its principal's: a request may make it again while a sweep
    that yields still has the earlier session's record to report. The report must not end the
    new session."""
    import mcp2anp_middleware.sessions.registry as registry_module
    from mcp2anp_middleware.sessions.loop_slice import LoopSlice

    monkeypatch.setattr(registry_module, "LoopSlice", lambda: LoopSlice(0.0))
    clock = ManualClock()
    sessions = registry(InMemorySessionStore(), clock)
    for _ in range(3):  # others expiring in the same sweep, reported first
        bob = sessions.new_session(BOB)
        await sessions.register(bob)
        await sessions.commit(bob)
    clock.advance(1)
    old, _ = await sessions.implicit_session(ALICE)
    await sessions.commit(old)
    clock.advance(TIMEOUT * 2)
    events = recorder(sessions)
    reporting = asyncio.Event()
    sessions.subscribe(lambda event: reporting.set())
    made: list[SessionState] = []

    async def request() -> None:
        await reporting.wait()  # the sweep has begun reporting, alice's record not yet
        new, created_now = await sessions.implicit_session(ALICE)
        assert created_now
        await sessions.commit(new)
        made.append(new)

    racing = asyncio.ensure_future(request())
    assert await sessions.sweep() == 4
    await racing
    new = made[0]
    assert new is not old and new.session_id == old.session_id
    assert not new.closed and await sessions.get(new.session_id, ALICE, implicit=True) is new
    alice = [(event.kind, event.state) for event in events if event.principal == "alice"]
    assert (SessionEventKind.EXPIRED, new) not in alice
    assert (SessionEventKind.CREATED, new) in alice


async def test_a_memory_store_expiry_cancelled_midway_loses_no_deadline() -> None:
    store = InMemorySessionStore(batch=2)
    for index in range(6):
        record = SessionRecord(f"s{index}", "alice", created_at=0.0, last_used=0.0, expires_at=1.0)
        assert (await store.create(record, ttl=1.0, now=0.0, caps=Caps())).created
    expiring = asyncio.ensure_future(store.expire(now=2.0))
    await asyncio.sleep(0)  # up to its first yield
    expiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await expiring
    assert 0 < len(store) < 6
    await store.expire(now=2.0)
    assert len(store) == 0  # every record left still had its deadline


def test_a_loop_slice_ends_after_its_steps_or_its_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp2anp_middleware.sessions import loop_slice as module

    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])  # (the module reads time's)
    by_steps = module.LoopSlice(60.0, steps=3)
    assert [by_steps.over() for _ in range(3)] == [False, False, True]
    by_time = module.LoopSlice(0.005)
    assert not by_time.over()
    now[0] += 0.004
    assert not by_time.over()
    now[0] += 0.002
    assert by_time.over()
    asyncio.run(by_time.next())  # a new slice, timed from when the task resumed
    assert not by_time.over()
    now[0] += 0.006
    assert by_time.over()
    asyncio.run(by_steps.next())  # and its count starts again
    assert [by_steps.over() for _ in range(3)] == [False, False, True]


async def test_a_cap_met_expires_no_session_a_request_still_runs_on(
    new_store: StoreFactory,
) -> None:
    """Past its maximum age a session is refused to new requests, and removed when its last one
    ends; a creation meeting the cap, which expires what the store still counts, must not
    remove it while a request runs (as the sweep renews it first)."""
    clock = ManualClock()
    sessions = registry(new_store(), clock, max_session_age=60.0, per_principal_cap=1)
    events = recorder(sessions)
    busy = await created(sessions)
    clock.advance(50)
    await sessions.acquire(busy)
    clock.advance(20)  # past its maximum age, its request still running, no sweep yet
    # (Refused in memory; Redis counts a session by its written deadline, here past.)
    with contextlib.suppress(CapExceeded):
        await sessions.register(sessions.new_session(ALICE))
    assert not busy.closed
    assert SessionEventKind.EXPIRED not in [event.kind for event in events]
    await sessions.release(busy)  # its last request ended: now it goes
    assert busy.closed
    assert await sessions.get(busy.session_id, ALICE) is None


async def test_a_cap_met_renews_a_busy_session_by_what_was_last_written_of_it() -> None:
    """A request's start on a memory store of one registry writes nothing (the record written
    when the last one ended keeps the session longer than a lease): the store's deadline is the
    written one, earlier than the live object's."""
    clock = ManualClock()
    sessions = registry(InMemorySessionStore(), clock, per_principal_cap=1)
    busy = await created(sessions)
    await sessions.acquire(busy)
    await sessions.release(busy)  # written: the store keeps it until t+60
    clock.advance(40)
    await sessions.acquire(busy)  # a long request begins: nothing written
    clock.advance(30)  # 70 s after the write, no sweep since
    with pytest.raises(CapExceeded):
        await sessions.register(sessions.new_session(ALICE))
    assert not busy.closed
    await sessions.release(busy)
    assert await sessions.get(busy.session_id, ALICE) is busy


async def test_an_implicit_session_committed_after_a_long_first_request_is_written_alive() -> None:
    """Committed by a write (a store another registry uses too) once its first request has run
    past the idle timeout: written with the request's lease, not with a deadline already past
    that the other registry's sweep would act on."""
    clock = ManualClock()
    store = InMemorySessionStore()
    sessions = registry(store, clock)
    other = registry(store, clock)  # (another worker: every commit is a write)
    state, created_now = await sessions.implicit_session(ALICE)
    assert created_now
    await sessions.acquire(state)
    clock.advance(3 * TIMEOUT)
    assert await sessions.sweep() == 0  # renewed while its request runs
    await sessions.commit(state)
    assert await other.sweep() == 0
    await sessions.release(state)
    assert await sessions.get(state.session_id, ALICE, implicit=True) is state


class SwallowsOneCancel(InMemorySessionStore):
    """Notices whose reading swallows the first cancellation, as redis-py's read did when its
    timeout fired as the cancellation arrived (it became a timeout, and the read went on)."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0
        self.listening = asyncio.Event()

    async def ended_sessions(self) -> AsyncIterator[str]:
        self.listening.set()
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1
            yield "changed:none"


async def test_following_other_processes_stops_though_a_cancellation_is_swallowed() -> None:
    """Before, the stop waited for good: the one cancellation was lost and the task went on."""
    store = SwallowsOneCancel()
    sessions = SessionRegistry(store=store)

    async def follow_then_stop() -> None:
        async with sessions.follow_other_processes():
            await store.listening.wait()

    stop = asyncio.ensure_future(follow_then_stop())
    done, _ = await asyncio.wait({stop}, timeout=10)
    assert stop in done and store.swallowed == 1
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "mcp2anp-session-follow"]
