"""One contract every session store must pass: in-memory and a real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mcp2anp_middleware import ManualClock, SessionConfig, SessionRegistry, SessionState
from mcp2anp_middleware.stores import (
    CapExceeded,
    Caps,
    InMemorySessionStore,
    SessionStore,
    StoreUnavailable,
)
from mcp2anp_middleware.stores.redis import RedisSessionStore

from .redis_server import RedisServer
from .servers import free_port

pytestmark = pytest.mark.anyio

ALICE = SessionConfig(principal="alice")
BOB = SessionConfig(principal="bob")
NO_CAPS = Caps()
TIMEOUT = 60.0

StoreFactory = Callable[[], SessionStore]


@pytest.fixture(params=["memory", "redis"])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Makes stores that share state the way processes would (same Redis prefix)."""
    made: list[SessionStore] = []
    if request.param == "memory":
        shared = InMemorySessionStore()

        def factory() -> SessionStore:
            return shared

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex[:8]}:"

        def factory() -> SessionStore:
            store = RedisSessionStore.from_url(server.url, prefix=prefix, touch_interval=10.0)
            made.append(store)
            return store

    yield factory
    for store in made:
        await store.aclose()


def session(principal: str = "alice", clock: ManualClock | None = None) -> SessionState:
    return SessionState(
        uuid.uuid4().hex, SessionConfig(principal=principal), clock=clock or ManualClock()
    )


async def test_create_is_create_if_absent(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    state = session(clock=clock)
    first = await store.create(state, ttl=TIMEOUT, now=clock(), caps=NO_CAPS)
    second = await store.create(state, ttl=TIMEOUT, now=clock(), caps=NO_CAPS)
    assert first.created and not second.created


async def test_concurrent_creators_never_share_an_id(new_store: StoreFactory) -> None:
    clock = ManualClock()
    stores = [new_store() for _ in range(5)]
    state = session(clock=clock)
    outcomes = await asyncio.gather(
        *[s.create(state, ttl=TIMEOUT, now=clock(), caps=NO_CAPS) for s in stores for _ in range(4)]
    )
    assert sum(outcome.created for outcome in outcomes) == 1


async def test_load_touch_delete_roundtrip(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    state = session(clock=clock)
    assert await store.load(state.session_id) is None
    await store.create(state, ttl=TIMEOUT, now=clock(), caps=NO_CAPS)
    loaded = await store.load(state.session_id)
    assert loaded is not None
    assert (loaded.principal, loaded.created_at, loaded.implicit) == ("alice", clock(), False)
    clock.advance(5)
    state.touch()
    assert await store.touch(state, ttl=TIMEOUT, now=clock())
    reloaded = await store.load(state.session_id)
    assert reloaded is not None and reloaded.last_accessed == clock()
    assert await store.delete(state.session_id)
    assert not await store.delete(state.session_id)
    assert await store.load(state.session_id) is None
    assert not await store.touch(state, ttl=TIMEOUT, now=clock())


async def test_counts(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    for principal in ("alice", "alice", "bob"):
        await store.create(session(principal, clock), ttl=TIMEOUT, now=clock(), caps=NO_CAPS)
    assert await store.count(now=clock()) == 3
    assert await store.count_for("alice", now=clock()) == 2
    assert await store.count_for("carol", now=clock()) == 0


async def test_per_principal_cap_rejects(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    caps = Caps(per_principal=2)
    for _ in range(2):
        await store.create(session("alice", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    with pytest.raises(CapExceeded) as refused:
        await store.create(session("alice", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    assert refused.value.scope == "principal"
    assert (await store.create(session("bob", clock), ttl=TIMEOUT, now=clock(), caps=caps)).created


async def test_per_principal_cap_evicts_least_recently_used(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    caps = Caps(per_principal=2, evict_oldest=True)
    first, second = session("alice", clock), session("alice", clock)
    await store.create(first, ttl=TIMEOUT, now=clock(), caps=caps)
    clock.advance(1)
    await store.create(second, ttl=TIMEOUT, now=clock(), caps=caps)
    clock.advance(1)
    first.touch()
    await store.touch(first, ttl=TIMEOUT, now=clock())  # first is now the most recently used
    third = session("alice", clock)
    outcome = await store.create(third, ttl=TIMEOUT, now=clock(), caps=caps)
    assert outcome.created and outcome.evicted == (second.session_id,)
    assert await store.load(second.session_id) is None
    assert await store.load(first.session_id) is not None


async def test_global_cap(new_store: StoreFactory) -> None:
    store, clock = new_store(), ManualClock()
    caps = Caps(global_limit=2)
    await store.create(session("alice", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    await store.create(session("bob", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    with pytest.raises(CapExceeded) as refused:
        await store.create(session("carol", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    assert refused.value.scope == "global"


def registry(store: SessionStore, clock: ManualClock, **options: Any) -> SessionRegistry:
    return SessionRegistry(store=store, clock=clock, session_timeout=TIMEOUT, **options)


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
    """Two registries over one store behave like two workers."""
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
    clock.advance(TIMEOUT * 3)
    await sessions.sweep()
    assert await sessions.get(state.session_id, ALICE) is state
    await sessions.release(state)
    clock.advance(TIMEOUT - 1)
    assert await sessions.get(state.session_id, ALICE) is state


async def test_redis_touches_are_throttled(redis_server: RedisServer) -> None:
    clock = ManualClock()
    store = RedisSessionStore.from_url(redis_server.url, prefix="throttle:", touch_interval=10.0)
    writes = 0
    original = store.touch

    async def counting_touch(*args: Any, **kwargs: Any) -> bool:
        nonlocal writes
        writes += 1
        return await original(*args, **kwargs)

    store.touch = counting_touch  # type: ignore[method-assign]
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


async def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await store.load("anything")
    assert not await store.ping()
    await store.aclose()


async def test_redis_store_works_with_a_client_that_returns_bytes(
    redis_server: RedisServer,
) -> None:
    from redis import asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)  # decode_responses left off
    store = RedisSessionStore(client, prefix="bytes:")
    clock = ManualClock()
    state = session(clock=clock)
    caps = Caps(per_principal=1)
    assert (await store.create(state, ttl=TIMEOUT, now=clock(), caps=caps)).created
    loaded = await store.load(state.session_id)
    assert loaded is not None and loaded.principal == "alice"
    with pytest.raises(CapExceeded):
        await store.create(session(clock=clock), ttl=TIMEOUT, now=clock(), caps=caps)
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
    assert old.closed or old is not seen_by_a
    assert await worker_b.get(new.session_id, ALICE, implicit=True) is not None


async def test_eviction_and_global_cap_agree(new_store: StoreFactory) -> None:
    """At both caps with eviction on, the new session replaces the principal's oldest; a
    principal not at its cap is refused at the global cap and nothing is evicted for it."""
    store, clock = new_store(), ManualClock()
    caps = Caps(per_principal=1, global_limit=2, evict_oldest=True)
    alice, bob = session("alice", clock), session("bob", clock)
    await store.create(alice, ttl=TIMEOUT, now=clock(), caps=caps)
    await store.create(bob, ttl=TIMEOUT, now=clock(), caps=caps)
    replacement = await store.create(session("alice", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    assert replacement.created and replacement.evicted == (alice.session_id,)
    with pytest.raises(CapExceeded) as refused:
        await store.create(session("carol", clock), ttl=TIMEOUT, now=clock(), caps=caps)
    assert refused.value.scope == "global"
    assert await store.load(bob.session_id) is not None
    assert await store.count(now=clock()) == 2
