"""The ``new_store`` fixture: stores that share state the way processes would."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from mcp2anp_middleware.sessions.stores import InMemorySessionStore, SessionStore
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

from .redis_server import RedisServer

StoreFactory = Callable[[], SessionStore]


@pytest.fixture(params=["memory", "redis"])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Each call gives a store over the same sessions: the one in-memory store, or a new client
    of one real redis-server under a fresh key prefix (a process of its own)."""
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
