"""Sessions on Redis Sentinel and Redis Cluster, against real deployments, through real launchers.

For each deployment: two launcher processes share a session; then the master serving it is
killed (SIGKILL) while both launchers are under load. What must hold: no request is answered 500
(during the failover window: 503 with Retry-After), the store reconnects by itself (requests
succeed again without a restart), and no acknowledged session is lost (every session whose id a
client received answers on both launchers afterwards; the store's ``WAIT 1`` makes that so).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis.exceptions

from mcp2anp_middleware import SessionConfig, ensure_dev_identity
from mcp2anp_middleware.sessions.registry import SessionRegistry
from mcp2anp_middleware.sessions.state import SessionState
from mcp2anp_middleware.sessions.stores.base import Caps, SessionRecord, UnconfirmedCommit
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .messages import INITIALIZE, PROTOCOL
from .processes import Launched, launcher
from .redis_deployments import (
    ClusterDeployment,
    Node,
    SentinelDeployment,
    cluster_deployment,
    command,
    info,
    sentinel_deployment,
    wait_for,
)
from .servers import free_port
from .test_two_processes import open_session, status

pytestmark = pytest.mark.anyio
__all__ = ["cluster_deployment", "sentinel_deployment"]  # fixtures, used by name

HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": PROTOCOL}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
RECOVERY_DEADLINE = 30.0


class Load:
    """Clients that keep creating and using sessions on both launchers, recording every answer."""

    def __init__(self, servers: list[Launched], sessions: list[str]) -> None:
        self.servers = servers
        self.acknowledged = list(sessions)
        self.statuses: Counter[int] = Counter()
        self.missing_retry_after = 0
        self.stopped = False

    def _record(self, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        if response.status_code == 503 and "retry-after" not in response.headers:
            self.missing_retry_after += 1

    async def client(self, index: int) -> None:
        async with httpx.AsyncClient(timeout=20) as http:
            turn = index
            while not self.stopped:
                server = self.servers[turn % len(self.servers)].base_url
                turn += 1
                try:
                    made = await http.post(f"{server}/mcp", json=INITIALIZE, headers=HEADERS)
                    self._record(made)
                    if made.status_code == 200 and "mcp-session-id" in made.headers:
                        self.acknowledged.append(made.headers["mcp-session-id"])
                    session = self.acknowledged[turn % len(self.acknowledged)]
                    headers = {**HEADERS, "Mcp-Session-Id": session}
                    self._record(await http.post(f"{server}/mcp", json=LIST, headers=headers))
                except httpx.TransportError:
                    self.statuses[0] += 1  # no answer at all: counted, and refused below
                await asyncio.sleep(0)


async def serves(base_url: str) -> bool:
    """A new session can be made here now (the store answers again)."""
    async with httpx.AsyncClient(timeout=10) as http:
        made = await http.post(f"{base_url}/mcp", json=INITIALIZE, headers=HEADERS)
    return made.status_code == 200


async def uses(base_url: str, session_id: str) -> bool:
    return await status("POST", base_url, session_id) == 200


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll ``check`` until true, against a deadline."""
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while True:
        answer = check()
        if answer if isinstance(answer, bool) else await answer:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def share_and_fail_over(
    tmp_path: Path,
    url: str,
    crash: Callable[[], Node],
    failed_over: Callable[[Node], bool],
    heal: Callable[[Node], None],
) -> None:
    """The scenario both deployments run; ``crash()`` kills a master and returns it,
    ``failed_over(victim)`` says when a replica serves in its place, ``heal(victim)`` restarts
    it as a replica (so later tests have a replicated deployment again)."""
    data_dir = tmp_path / "data"
    ensure_dev_identity(data_dir)
    store = ("--store-url", url)
    with (
        launcher(tmp_path, *store, port=free_port(), name="a", data_dir=data_dir) as a,
        launcher(tmp_path, *store, port=free_port(), name="b", data_dir=data_dir) as b,
    ):
        shared = await open_session(a.base_url)
        assert await status("POST", b.base_url, shared) == 200  # made on A, used on B

        load = Load([a, b], [shared])
        clients = [asyncio.create_task(load.client(i)) for i in range(4)]
        try:
            await eventually(lambda: sum(load.statuses.values()) >= 20, "load to start")
            victim = crash()
            await asyncio.to_thread(wait_for, lambda: failed_over(victim), "the failover")
            # Reconnected by itself, to the promoted replica: both launchers serve the shared
            # session again, with no restart. (New sessions wait for a replica: WAIT 1.)
            await eventually(lambda: uses(a.base_url, shared), "launcher A to serve again")
            await eventually(lambda: uses(b.base_url, shared), "launcher B to serve again")
            await asyncio.to_thread(heal, victim)
            await eventually(lambda: serves(a.base_url), "launcher A to create sessions again")
            await eventually(lambda: serves(b.base_url), "launcher B to create sessions again")
            before = load.statuses[200]
            await eventually(lambda: load.statuses[200] >= before + 20, "the load to recover")
        finally:
            load.stopped = True
            await asyncio.gather(*clients)

        assert load.statuses[500] == 0 and load.statuses[0] == 0, load.statuses
        # 409: two of these clients used one session at once with the same request id (the MCP
        # layer refuses an id already in flight), not a store failure; every acknowledged
        # session is checked on both launchers below.
        assert set(load.statuses) <= {200, 202, 409, 503}, load.statuses
        assert load.missing_retry_after == 0
        # No acknowledged session lost: each one answers on both launchers.
        for session_id in load.acknowledged:
            assert await status("POST", a.base_url, session_id) == 200, session_id
            assert await status("POST", b.base_url, session_id) == 200, session_id
        assert await status("DELETE", b.base_url, shared) == 204
        assert await status("POST", a.base_url, shared) == 404  # B's DELETE seen by A


async def test_sentinel_two_launchers_and_master_failover(
    tmp_path: Path, sentinel_deployment: SentinelDeployment
) -> None:
    deployment = sentinel_deployment
    await share_and_fail_over(
        tmp_path,
        deployment.url,
        deployment.crash_master,
        lambda victim: deployment.master_port() != victim.port,
        deployment.heal,
    )


async def test_cluster_two_launchers_and_master_failover(
    tmp_path: Path, cluster_deployment: ClusterDeployment
) -> None:
    deployment = cluster_deployment
    probe = "mcp2anp:all:{0}"  # a shard of the global index: every creation touches one

    def crash() -> Node:
        victim = deployment.master_for(probe)
        deployment.crash(victim)
        return victim

    def failed_over(victim: Node) -> bool:
        owner = deployment.owner(probe)
        return owner is not None and owner.port != victim.port

    await share_and_fail_over(tmp_path, deployment.url, crash, failed_over, deployment.heal)


async def test_cluster_keys_of_a_session_share_a_slot(
    cluster_deployment: ClusterDeployment,
) -> None:
    """The session's record and its MCP event log hash to one slot; a principal's index to the
    principal's; the global index is spread over shards on several masters."""
    store = RedisSessionStore.from_url(cluster_deployment.url, prefix="slots:")
    client = store.client
    from mcp2anp_middleware.mcp_hosting.redis_backplane import RedisEventLog

    log = RedisEventLog(client, prefix="slots:")
    assert client.keyslot(store._session_key("abc")) == client.keyslot(log.key("abc"))
    masters = {deployment_owner(cluster_deployment, store._shard(i)) for i in range(16)}
    assert len(masters) >= 2
    await store.aclose()


class DeletedBetweenSteps(RedisSessionStore):
    """A cluster write whose first steps are followed, before the last, by another worker's
    DELETE of the session."""

    other: SessionRegistry | None = None

    async def _touch_in_cluster(self, record: SessionRecord, now: float, ttl_ms: int) -> str | None:
        pkey = await super()._touch_in_cluster(record, now, ttl_ms)
        other, self.other = self.other, None
        if other is not None:
            await other.remove(record.session_id, reason="deleted")
        return pkey


async def test_a_write_racing_a_delete_on_a_cluster_leaves_no_ghost(
    cluster_deployment: ClusterDeployment,
) -> None:
    """On a cluster a write is several steps and only the first is fenced: a DELETE on another
    worker landing between them had its index entries put back, a ghost that counted against
    the caps until it expired (a principal at its cap refused every new session for the idle
    timeout). The write takes them out again."""
    prefix = f"ghost-{uuid.uuid4().hex[:8]}:"
    url = cluster_deployment.url
    store_a = DeletedBetweenSteps.from_url(url, prefix=prefix, touch_interval=0.0)
    store_b = RedisSessionStore.from_url(url, prefix=prefix, touch_interval=0.0)
    worker_a = SessionRegistry(store=store_a, session_timeout=1800.0, per_principal_cap=1)
    worker_b = SessionRegistry(store=store_b, session_timeout=1800.0, per_principal_cap=1)
    alice = SessionConfig(principal=f"alice-{uuid.uuid4().hex[:8]}")
    try:
        state = worker_a.new_session(alice)
        await worker_a.register(state, reservation=30.0)
        await worker_a.commit(state)
        await worker_a.acquire(state)
        store_a.other = worker_b
        await worker_a.release(state)  # its write, with B's DELETE between its steps
        assert state.closed
        assert await store_b.read(state.session_id) is None
        assert await store_b.count(now=worker_b.clock()) == 0
        index = store_b._principal_key(alice.principal)
        assert await store_b.client.zrange(index, 0, -1) == []
        fresh = worker_b.new_session(alice)
        await worker_b.register(fresh, reservation=30.0)  # not refused at the cap of 1
    finally:
        await store_a.aclose()
        await store_b.aclose()


class RemadeAfterTheCheck(DeletedBetweenSteps):
    """As :class:`DeletedBetweenSteps`, and once the write found its record gone, the
    principal's next request makes its implicit session anew (the same id) on a third worker,
    before the write takes its index entries out."""

    remake: SessionRegistry | None = None
    config: SessionConfig | None = None
    made: SessionState | None = None

    async def _gone_meanwhile(self, sid: str, pkey: str | None, expires: float) -> bool:
        exists = self.client.exists

        async def then_remade(*keys: str) -> int:
            found = int(await exists(*keys))
            remake, self.remake = self.remake, None
            if remake is not None and self.config is not None:
                self.made, created = await remake.implicit_session(self.config)
                assert created
                await remake.commit(self.made)
            return found

        self.client.exists = then_remade
        try:
            return await super()._gone_meanwhile(sid, pkey, expires)
        finally:
            self.client.exists = exists


async def test_a_ghost_taken_out_leaves_the_entries_of_a_session_made_anew(
    cluster_deployment: ClusterDeployment,
) -> None:
    """Only the entries the racing write put back are taken out: a principal's implicit session
    made anew meanwhile (the same id) keeps its own, and counts against the caps."""
    prefix = f"anew-{uuid.uuid4().hex[:8]}:"
    url = cluster_deployment.url
    stores = [
        RemadeAfterTheCheck.from_url(url, prefix=prefix, touch_interval=0.0),
        RedisSessionStore.from_url(url, prefix=prefix, touch_interval=0.0),
        RedisSessionStore.from_url(url, prefix=prefix, touch_interval=0.0),
    ]
    store_a = stores[0]
    assert isinstance(store_a, RemadeAfterTheCheck)
    a, b, c = (
        SessionRegistry(store=store, session_timeout=1800.0, per_principal_cap=1)
        for store in stores
    )
    alice = SessionConfig(principal=f"alice-{uuid.uuid4().hex[:8]}")
    try:
        state, created = await a.implicit_session(alice)
        assert created
        await a.commit(state)
        await a.acquire(state)
        store_a.other, store_a.remake, store_a.config = b, c, alice
        await a.release(state)  # its write; B's DELETE; the check; C makes it anew; the cleanup
        assert store_a.made is not None
        assert await stores[1].read(store_a.made.session_id) is not None
        index = stores[1]._principal_key(alice.principal)
        assert await stores[1].client.zrange(index, 0, -1) == [store_a.made.session_id]
        assert await stores[1].count(now=b.clock()) == 1
    finally:
        for store in stores:
            await store.aclose()


class ExistsFailsAfterEvicting(RedisSessionStore):
    """The store fails right after a commit's eviction step."""

    armed = False

    async def _settle_in_cluster(
        self, sid: str, pkey: str, now: float, ttl_ms: int, caps: Caps
    ) -> tuple[SessionRecord, ...]:
        evicted = await super()._settle_in_cluster(sid, pkey, now, ttl_ms, caps)
        if self.armed:

            async def down(*keys: str) -> int:
                raise redis.exceptions.ConnectionError("master gone")

            self.client.exists = down
        return evicted


async def test_a_commit_that_evicted_and_then_fails_still_ends_its_victims(
    cluster_deployment: ClusterDeployment,
) -> None:
    """The check that the committed record is still there comes after the eviction: if the
    store fails then, the victims are gone all the same, so they are ended and announced."""
    prefix = f"victims-{uuid.uuid4().hex[:8]}:"
    store = ExistsFailsAfterEvicting.from_url(cluster_deployment.url, prefix=prefix)
    reader = RedisSessionStore.from_url(cluster_deployment.url, prefix=prefix)
    worker = SessionRegistry(
        store=store, session_timeout=1800.0, per_principal_cap=1, evict_oldest=True
    )
    alice = SessionConfig(principal=f"alice-{uuid.uuid4().hex[:8]}")
    try:
        old = worker.new_session(alice)
        await worker.register(old, reservation=30.0)
        await worker.commit(old)
        new = worker.new_session(alice)
        await worker.register(new, reservation=30.0)
        store.armed = True
        with pytest.raises(UnconfirmedCommit):
            await worker.commit(new)
        assert await reader.read(old.session_id) is None
        assert old.closed
    finally:
        await store.aclose()
        await reader.aclose()


def deployment_owner(deployment: ClusterDeployment, key: str) -> int:
    return deployment.master_for(key).port


def _calls(port: int, name: str) -> int:
    """How often the Redis server at ``port`` ran command ``name``, its subcommands included
    (0 if never): Redis 7 reports a container command's subcommands on their own lines
    (``cmdstat_script|load``), earlier versions under the command."""
    stats = info(port, "commandstats")
    return sum(
        int(stat.split(",")[0].removeprefix("calls="))
        for key, stat in stats.items()
        if key == f"cmdstat_{name}" or key.startswith(f"cmdstat_{name}|")
    )


async def test_a_durable_write_is_one_pipeline_without_script_checks(
    sentinel_deployment: SentinelDeployment,
) -> None:
    """With a replica to wait for, a creation, a write and a removal each go as EVALSHA and
    WAIT in one pipeline: redis-py's SCRIPT EXISTS before a pipeline carrying a script (a
    round trip more each time) is never sent. A master that lost its scripts answers NOSCRIPT;
    the script is loaded and run once."""
    deployment = sentinel_deployment
    store = RedisSessionStore.from_url(deployment.url, prefix=f"durable-{uuid.uuid4().hex}:")
    assert store.wait_replicas == 1
    port = deployment.master_port()
    command(port, "SCRIPT", "FLUSH")  # the master forgets every script it knew
    try:
        # First round: each script is unknown, answered NOSCRIPT, loaded (SCRIPT LOAD), and its
        # pair sent again. Second round: one EVALSHA and one WAIT each, no SCRIPT command at all
        # (SCRIPT LOAD and SCRIPT EXISTS alike).
        for sent_per_step, loads in ((2, 3), (1, 0)):
            before = {name: _calls(port, name) for name in ("evalsha", "wait", "script")}
            record = SessionRecord(uuid.uuid4().hex, "alice", 1.0, 1.0, 61.0)
            assert (await store.create(record, ttl=60, now=1.0, caps=Caps())).created
            assert await store.write(replace(record, last_used=2.0), ttl=60, now=2.0)
            assert await store.remove(record.session_id)
            after = {name: _calls(port, name) for name in before}
            assert after["evalsha"] - before["evalsha"] == 3 * sent_per_step
            assert after["wait"] - before["wait"] == 3 * sent_per_step
            assert after["script"] - before["script"] == loads
    finally:
        await store.aclose()
