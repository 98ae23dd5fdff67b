"""The ``new_store`` fixture: stores that share state the way processes would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from mcp2anp_middleware.sessions.stores import InMemorySessionStore, SessionStore
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .redis_deployments import ClusterDeployment, SentinelDeployment, shared_deployment
from .redis_server import RedisServer

StoreFactory = Callable[[], SessionStore]


def redis_url(request: pytest.FixtureRequest, deployment: str) -> str:
    """The URL of one of the Redis deployments (started on first use, once per session)."""
    if deployment in ("sentinel", "cluster"):
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        started: SentinelDeployment | ClusterDeployment = shared_deployment(
            request.config, deployment, factory.mktemp(deployment)
        )
        return started.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Each call gives a store over the same sessions: the one in-memory store, or a new client
    of a real Redis deployment (one redis-server, a Sentinel-managed master with a replica, or a
    six-node cluster) under a fresh key prefix (a process of its own)."""
    made: list[SessionStore] = []
    if request.param == "memory":
        shared = InMemorySessionStore()

        def factory() -> SessionStore:
            return shared

    else:
        url = redis_url(request, request.param)
        prefix = f"test-{uuid.uuid4().hex[:8]}:"

        def factory() -> SessionStore:
            store = RedisSessionStore.from_url(url, prefix=prefix, touch_interval=10.0)
            made.append(store)
            return store

    yield factory
    for store in made:
        await store.aclose()
