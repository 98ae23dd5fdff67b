"""One contract every session store must pass, at the store interface itself: in-memory, a real
redis-server, a real Sentinel deployment and a real Redis Cluster. Registry behaviour over the
stores is in ``test_registry.py``; failover in ``test_redis_ha.py``."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis import asyncio as aioredis

from mcp2anp_middleware.sessions.stores import (
    CapExceeded,
    Caps,
    InMemorySessionStore,
    SessionRecord,
    StoreUnavailable,
)
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .redis_deployments import cluster_deployment, sentinel_deployment
from .redis_server import RedisServer
from .servers import free_port
from .store_fixture import StoreFactory, new_store

pytestmark = pytest.mark.anyio
__all__ = ["cluster_deployment", "new_store", "sentinel_deployment"]  # fixtures, used by name

NO_CAPS = Caps()
TTL = 60.0
NOW = 1_000_000.0


def record(principal: str = "alice", *, at: float = NOW, ttl: float = TTL) -> SessionRecord:
    return SessionRecord(uuid.uuid4().hex, principal, at, at, at + ttl)


def used(old: SessionRecord, at: float, ttl: float = TTL) -> SessionRecord:
    return SessionRecord(old.session_id, old.principal, old.created_at, at, at + ttl, old.implicit)


async def test_create_is_create_if_absent(new_store: StoreFactory) -> None:
    store = new_store()
    new = record()
    first = await store.create(new, ttl=TTL, now=NOW, caps=NO_CAPS)
    second = await store.create(new, ttl=TTL, now=NOW, caps=NO_CAPS)
    assert first.created and not second.created


async def test_concurrent_creators_never_share_an_id(new_store: StoreFactory) -> None:
    stores = [new_store() for _ in range(5)]
    new = record()
    outcomes = await asyncio.gather(
        *[s.create(new, ttl=TTL, now=NOW, caps=NO_CAPS) for s in stores for _ in range(4)]
    )
    assert sum(outcome.created for outcome in outcomes) == 1


async def test_read_write_remove_roundtrip(new_store: StoreFactory) -> None:
    store = new_store()
    new = SessionRecord(uuid.uuid4().hex, "alice", NOW, NOW, NOW + TTL, implicit=True)
    assert await store.read(new.session_id) is None
    await store.create(new, ttl=TTL, now=NOW, caps=NO_CAPS)
    assert await store.read(new.session_id) == new
    later = used(new, NOW + 5)
    assert await store.write(later, ttl=TTL, now=NOW + 5)
    assert await store.read(new.session_id) == later
    assert await store.remove(new.session_id)
    assert not await store.remove(new.session_id)
    assert await store.read(new.session_id) is None
    assert not await store.write(later, ttl=TTL, now=NOW + 5)  # never re-creates
    assert await store.read(new.session_id) is None


async def test_write_and_fenced_remove_apply_to_that_very_session(new_store: StoreFactory) -> None:
    """A record is known by id and creation time: a write or fenced remove for an earlier
    session with the same id (implicit ids repeat) leaves the current one alone."""
    store = new_store()
    current = record()
    await store.create(current, ttl=TTL, now=NOW, caps=NO_CAPS)
    earlier = SessionRecord(current.session_id, "alice", NOW - 100, NOW + 1, NOW + 61)
    assert not await store.write(earlier, ttl=TTL, now=NOW + 1)
    assert not await store.remove(current.session_id, created_at=NOW - 100)
    assert await store.read(current.session_id) == current
    assert await store.remove(current.session_id, created_at=NOW)


async def test_counts_and_principal_listing(new_store: StoreFactory) -> None:
    store = new_store()
    first, second, bobs = record("alice"), record("alice", at=NOW + 1), record("bob")
    for new in (first, second, bobs):
        await store.create(new, ttl=TTL, now=new.created_at, caps=NO_CAPS)
    assert await store.count(now=NOW + 1) == 3
    await store.write(used(first, NOW + 2), ttl=TTL, now=NOW + 2)  # first: most recently used
    listed = await store.principal_sessions("alice", now=NOW + 2)
    assert [r.session_id for r in listed] == [second.session_id, first.session_id]
    assert await store.principal_sessions("carol", now=NOW) == []
    # Past their expiry they are no longer listed (Redis's TTL, the memory store's deadline).
    assert await store.principal_sessions("bob", now=NOW + TTL + 1) == []


async def test_expire_removes_what_is_past_its_deadline(new_store: StoreFactory) -> None:
    store = new_store()
    short, long = record(ttl=10), record(ttl=100)
    for new in (short, long):
        await store.create(new, ttl=new.expires_at - NOW, now=NOW, caps=NO_CAPS)
    await store.write(used(short, NOW + 5, ttl=10), ttl=10, now=NOW + 5)  # pushed to NOW + 15
    assert await store.expire(now=NOW + 12) == []
    expired = await store.expire(now=NOW + 16)
    if isinstance(store, RedisSessionStore):
        assert expired == []  # native TTL: Redis removes them itself, on its own clock
        assert await store.count(now=NOW + 16) == 1  # the index follows the deadline
    else:
        assert [r.session_id for r in expired] == [short.session_id]
        assert await store.read(short.session_id) is None
        assert await store.read(long.session_id) is not None


async def test_per_principal_cap_rejects(new_store: StoreFactory) -> None:
    store = new_store()
    caps = Caps(per_principal=2)
    for _ in range(2):
        await store.create(record("alice"), ttl=TTL, now=NOW, caps=caps)
    with pytest.raises(CapExceeded) as refused:
        await store.create(record("alice"), ttl=TTL, now=NOW, caps=caps)
    assert refused.value.scope == "principal"
    assert (await store.create(record("bob"), ttl=TTL, now=NOW, caps=caps)).created


async def test_per_principal_cap_evicts_least_recently_used(new_store: StoreFactory) -> None:
    """Three sessions at a cap of three: the least recently used goes, not the oldest."""
    store = new_store()
    caps = Caps(per_principal=3, evict_oldest=True)
    oldest, middle, newest = record(at=NOW), record(at=NOW + 1), record(at=NOW + 2)
    for new in (oldest, middle, newest):
        await store.create(new, ttl=TTL, now=new.created_at, caps=caps)
    await store.write(used(oldest, NOW + 3), ttl=TTL, now=NOW + 3)  # oldest, but used last
    outcome = await store.create(record(at=NOW + 4), ttl=TTL, now=NOW + 4, caps=caps)
    assert outcome.created
    assert [r.session_id for r in outcome.evicted] == [middle.session_id]
    assert outcome.evicted[0].principal == "alice"
    assert await store.read(middle.session_id) is None
    assert await store.read(oldest.session_id) is not None


async def test_global_cap(new_store: StoreFactory) -> None:
    store = new_store()
    caps = Caps(global_limit=2)
    await store.create(record("alice"), ttl=TTL, now=NOW, caps=caps)
    await store.create(record("bob"), ttl=TTL, now=NOW, caps=caps)
    with pytest.raises(CapExceeded) as refused:
        await store.create(record("carol"), ttl=TTL, now=NOW, caps=caps)
    assert refused.value.scope == "global"


async def test_eviction_and_global_cap_agree(new_store: StoreFactory) -> None:
    """At both caps with eviction on, the new session replaces the principal's oldest; a
    principal not at its cap is refused at the global cap and nothing is evicted for it."""
    store = new_store()
    caps = Caps(per_principal=1, global_limit=2, evict_oldest=True)
    alice, bob = record("alice"), record("bob")
    await store.create(alice, ttl=TTL, now=NOW, caps=caps)
    await store.create(bob, ttl=TTL, now=NOW, caps=caps)
    replacement = await store.create(record("alice"), ttl=TTL, now=NOW, caps=caps)
    assert replacement.created and [r.session_id for r in replacement.evicted] == [alice.session_id]
    with pytest.raises(CapExceeded) as refused:
        await store.create(record("carol"), ttl=TTL, now=NOW, caps=caps)
    assert refused.value.scope == "global"
    assert await store.read(bob.session_id) is not None
    assert await store.count(now=NOW) == 2


async def test_a_reservation_evicts_nothing_until_its_commit(new_store: StoreFactory) -> None:
    """A pending creation (an ``initialize`` still being served) counts against the caps but
    evicts only once committed; refused and removed, it cost its principal nothing."""
    store = new_store()
    caps = Caps(per_principal=1, evict_oldest=True)
    first = record()
    await store.create(first, ttl=TTL, now=NOW, caps=caps)
    refused = record(at=NOW + 1)
    outcome = await store.create(refused, ttl=TTL, now=NOW + 1, caps=caps, pending=True)
    assert outcome.created and outcome.evicted == ()
    assert await store.remove(refused.session_id, created_at=refused.created_at)
    assert await store.read(first.session_id) == first
    served = record(at=NOW + 2)
    outcome = await store.create(served, ttl=TTL, now=NOW + 2, caps=caps, pending=True)
    assert outcome.evicted == () and await store.read(first.session_id) is not None
    committed = await store.commit(used(served, NOW + 3), ttl=TTL, now=NOW + 3, caps=caps)
    assert committed.committed and committed.evicted == (first,)
    assert await store.read(first.session_id) is None
    assert [r.session_id for r in await store.principal_sessions("alice", now=NOW + 3)] == [
        served.session_id
    ]


async def test_reservations_are_never_evicted(new_store: StoreFactory) -> None:
    """Nothing evicts a creation still pending: a session that counts at once beside it evicts
    nothing (the principal holds only one that counts), and the reservation's commit then evicts
    that one, the least recently used of those that count."""
    store = new_store()
    caps = Caps(per_principal=1, evict_oldest=True)
    pending = record()
    await store.create(pending, ttl=TTL, now=NOW, caps=caps, pending=True)
    other = record(at=NOW + 1)
    assert (await store.create(other, ttl=TTL, now=NOW + 1, caps=caps)).evicted == ()
    committed = await store.commit(used(pending, NOW + 2), ttl=TTL, now=NOW + 2, caps=caps)
    assert committed.committed and committed.evicted == (other,)
    assert await store.read(pending.session_id) is not None


async def test_an_evicting_principal_holds_at_most_twice_its_cap(new_store: StoreFactory) -> None:
    """Creations under way may take an evicting principal past its cap (each evicts at its
    commit), but not past twice the cap: beyond that it is refused as without eviction."""
    store = new_store()
    caps = Caps(per_principal=2, evict_oldest=True)
    for _ in range(2):
        await store.create(record(), ttl=TTL, now=NOW, caps=caps)
    under_way = [record(at=NOW + 1) for _ in range(2)]
    for new in under_way:
        await store.create(new, ttl=TTL, now=NOW + 1, caps=caps, pending=True)
    with pytest.raises(CapExceeded) as refused:
        await store.create(record(at=NOW + 2), ttl=TTL, now=NOW + 2, caps=caps, pending=True)
    assert refused.value.scope == "principal"
    for new in under_way:
        outcome = await store.commit(used(new, NOW + 3), ttl=TTL, now=NOW + 3, caps=caps)
        assert outcome.committed and len(outcome.evicted) == 1
    assert {r.session_id for r in await store.principal_sessions("alice", now=NOW + 3)} == {
        new.session_id for new in under_way
    }


async def test_a_commit_of_a_record_gone_commits_nothing(new_store: StoreFactory) -> None:
    store = new_store()
    caps = Caps(per_principal=1, evict_oldest=True)
    first, gone = record(), record(at=NOW + 1)
    await store.create(first, ttl=TTL, now=NOW, caps=caps)
    await store.create(gone, ttl=TTL, now=NOW + 1, caps=caps, pending=True)
    await store.remove(gone.session_id)
    outcome = await store.commit(used(gone, NOW + 2), ttl=TTL, now=NOW + 2, caps=caps)
    assert not outcome.committed and outcome.evicted == ()
    assert await store.read(first.session_id) is not None
    assert await store.read(gone.session_id) is None  # (never made again)


async def test_a_reservation_at_both_caps_takes_the_place_its_commit_frees(
    new_store: StoreFactory,
) -> None:
    """At the global cap, an evicting principal at its own cap may still reserve (its commit
    evicts one of its sessions, so the total comes back): one over the global cap at most while
    it is under way, so another principal, at its cap or not, is refused meanwhile."""
    store = new_store()
    caps = Caps(per_principal=1, global_limit=2, evict_oldest=True)
    alice, bob = record("alice"), record("bob")
    await store.create(alice, ttl=TTL, now=NOW, caps=caps)
    await store.create(bob, ttl=TTL, now=NOW, caps=caps)
    new = record("alice", at=NOW + 1)
    await store.create(new, ttl=TTL, now=NOW + 1, caps=caps, pending=True)
    for principal in ("bob", "carol"):
        with pytest.raises(CapExceeded) as refused:
            await store.create(record(principal), ttl=TTL, now=NOW + 1, caps=caps, pending=True)
        assert refused.value.scope == "global"
    outcome = await store.commit(used(new, NOW + 2), ttl=TTL, now=NOW + 2, caps=caps)
    assert outcome.evicted == (alice,)
    assert await store.count(now=NOW + 2) == 2


async def test_a_creation_refused_at_the_global_cap_evicts_nothing(new_store: StoreFactory) -> None:
    """A creation that counts at once (a restored session) and is refused at the global cap
    leaves its principal's sessions as they were: indexed, listed, counted."""
    store = new_store()
    caps = Caps(per_principal=1, global_limit=2, evict_oldest=True)
    alice, bob = record("alice"), record("bob")
    await store.create(alice, ttl=TTL, now=NOW, caps=caps)
    await store.create(bob, ttl=TTL, now=NOW, caps=caps)
    await store.create(record("alice"), ttl=TTL, now=NOW, caps=caps, pending=True)
    with pytest.raises(CapExceeded):
        await store.create(record("bob"), ttl=TTL, now=NOW, caps=caps)
    assert await store.principal_sessions("bob", now=NOW) == [bob]
    with pytest.raises(CapExceeded) as refused:  # bob is still at his cap of one
        await store.create(record("bob"), ttl=TTL, now=NOW, caps=Caps(per_principal=1))
    assert refused.value.scope == "principal"


async def test_a_reservation_made_without_eviction_is_not_evicted(new_store: StoreFactory) -> None:
    """Reservations are kept whatever the caps of the process that made them: one with eviction
    on (another worker, another configuration) passes over them as over its own."""
    store = new_store()
    pending = record()
    await store.create(pending, ttl=TTL, now=NOW, caps=NO_CAPS, pending=True)
    caps = Caps(per_principal=1, evict_oldest=True)
    outcome = await store.create(record(at=NOW + 1), ttl=TTL, now=NOW + 1, caps=caps)
    assert outcome.evicted == ()
    assert await store.read(pending.session_id) is not None


async def test_a_reservation_renewed_before_its_commit_stays_one(new_store: StoreFactory) -> None:
    """A creation whose request outlives its first reservation has its record written again
    (a lease renewed by the sweep): it stays a reservation, which nothing evicts and which does
    not count, for as long as that write keeps it."""
    store = new_store()
    caps = Caps(per_principal=2, evict_oldest=True)
    older = record(ttl=5000)
    await store.create(older, ttl=5000, now=NOW, caps=caps)
    pending = record(at=NOW + 1, ttl=30)
    await store.create(pending, ttl=30, now=NOW + 1, caps=caps, pending=True)
    await store.write(used(pending, NOW + 2, ttl=1000), ttl=1000, now=NOW + 2)
    later = record(at=NOW + 40, ttl=1000)  # the first reservation would have lapsed by now
    outcome = await store.create(later, ttl=1000, now=NOW + 40, caps=caps)
    assert outcome.evicted == ()  # two count: older and later
    assert await store.read(pending.session_id) is not None


async def test_ping_and_aclose(new_store: StoreFactory) -> None:
    store = new_store()
    assert await store.ping()
    await store.aclose()
    if isinstance(store, RedisSessionStore):  # a closed client reconnects on next use
        assert await store.ping()


async def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        await store.read("anything")
    with pytest.raises(StoreUnavailable):
        await store.create(record(), ttl=TTL, now=NOW, caps=NO_CAPS)
    assert not await store.ping()
    await store.aclose()


async def test_a_replica_wait_longer_than_the_client_waits_is_refused() -> None:
    """The client would give up on WAIT's answer first: a change Redis made (an eviction)
    would look like one it never made. Refused when the store is made, before connecting."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(ValueError, match="wait_timeout"):
        RedisSessionStore.from_url(url, timeout=2.0, wait_replicas=1, wait_timeout=2.0)
    store = RedisSessionStore.from_url(url, timeout=2.0, wait_replicas=1, wait_timeout=0.5)
    await store.aclose()
    RedisSessionStore.from_url(url, timeout=2.0, wait_replicas=0, wait_timeout=9.0)  # no WAIT


async def test_redis_store_works_with_a_client_that_returns_bytes(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)  # decode_responses left off
    store = RedisSessionStore(client, prefix=f"bytes-{uuid.uuid4().hex[:6]}:")
    caps = Caps(per_principal=1, evict_oldest=True)
    first = record()
    assert (await store.create(first, ttl=TTL, now=NOW, caps=caps)).created
    assert await store.read(first.session_id) == first
    replacement = await store.create(record(), ttl=TTL, now=NOW, caps=caps)
    assert replacement.evicted == (first,)
    assert len(await store.principal_sessions("alice", now=NOW)) == 1
    await store.aclose()


async def test_memory_store_deadlines_moved_either_way_expire_on_time() -> None:
    """The memory store pushes a deadline entry for a new session and for a deadline moved
    earlier, not for one moved later (the earlier entry is looked at again when it comes due),
    and expires each session at its last deadline: moved later many times, moved earlier, or a
    session removed and made again under its id."""
    store = InMemorySessionStore()
    later, earlier, again = record(ttl=10), record(ttl=100), record(ttl=10)
    for new in (later, earlier, again):
        await store.create(new, ttl=new.expires_at - NOW, now=NOW, caps=NO_CAPS)
    for step in range(1, 50):  # used every second: its deadline moves on each time
        assert await store.write(used(later, NOW + step), ttl=TTL, now=NOW + step)
    assert await store.write(used(earlier, NOW, ttl=20), ttl=20, now=NOW)  # (max age, say)
    assert await store.remove(again.session_id)
    remade = SessionRecord(again.session_id, "alice", NOW + 1, NOW + 1, NOW + 31)
    await store.create(remade, ttl=30, now=NOW + 1, caps=NO_CAPS)
    assert len(store._deadlines) == 5  # each creation, the deadline moved earlier: no write more
    assert await store.expire(now=NOW + 19) == []
    assert [r.session_id for r in await store.expire(now=NOW + 20)] == [earlier.session_id]
    assert await store.expire(now=NOW + 30) == []
    assert [r.created_at for r in await store.expire(now=NOW + 31)] == [NOW + 1]
    assert await store.expire(now=NOW + 49 + TTL - 1) == []
    assert [r.session_id for r in await store.expire(now=NOW + 49 + TTL)] == [later.session_id]
    assert len(store) == 0
