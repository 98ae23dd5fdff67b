"""6. Redis store: round trips per request, and requests/second with memory vs Redis.

A real ``redis-server`` is started on a free loopback port (``tests/redis_server.py``). The
middleware (``MCPSessionMiddleware``) wraps a trivial inner MCP app (reads the body, answers a
fixed JSON-RPC result) and is driven in-process with direct ASGI calls, in the handshake era with
an ``Mcp-Session-Id`` of a session created by ``initialize``. The requests are touch-free: within
``touch_interval`` (default 30 s) of the session's last write, so the store is only read.

Round trips are counted two ways: a wrapper around the redis client's ``execute_command`` (one
call = one round trip; a script is one ``EVALSHA``), and Redis's own ``INFO commandstats`` before
and after (commands run inside scripts are counted there too, so it is a cross-check only).
Requests/second: the memory-store and Redis-store middlewares alternate in batches; the ratio is
the median of paired ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore
from tests.redis_server import RedisServer

from .common import Result, call_asgi, cost_of, http_scope, log, paired_async, run_module, spread

HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"content-type", b"application/json"),
    (b"accept", b"application/json, text/event-stream"),
    (b"mcp-protocol-version", b"2025-11-25"),
]
INITIALIZE = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}
).encode()
REQUEST = json.dumps(
    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "ping"}}
).encode()


async def trivial_mcp_app(scope: Any, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"jsonrpc":"2.0","id":2,"result":{}}'})


async def host_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def open_session(middleware: MCPSessionMiddleware) -> dict[str, Any]:
    created = await call_asgi(middleware, http_scope("POST", "/mcp", HEADERS), INITIALIZE)
    session_id = created.header(b"mcp-session-id")
    assert created.status == 200 and session_id, created.status
    scope = http_scope("POST", "/mcp", [*HEADERS, (b"mcp-session-id", session_id)])
    answer = await call_asgi(middleware, scope, REQUEST)
    assert answer.status == 200, answer.status
    return scope


async def run(quick: bool, redis_url: str) -> list[Result]:
    store = RedisSessionStore.from_url(redis_url)
    round_trips = 0
    execute = store.client.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal round_trips
        round_trips += 1
        return await execute(*args, **kwargs)

    store.client.execute_command = counting
    on_redis = MCPSessionMiddleware(host_app, mcp_app=trivial_mcp_app, store=store)
    in_memory = MCPSessionMiddleware(host_app, mcp_app=trivial_mcp_app)
    admin = redis.Redis.from_url(redis_url)
    await on_redis.startup()
    await in_memory.startup()
    try:
        redis_scope = await open_session(on_redis)
        memory_scope = await open_session(in_memory)
        count = 500 if quick else 2000
        before = commandstats(admin)
        round_trips = 0
        await cost_of(on_redis, redis_scope, REQUEST, count)
        counted = round_trips
        after = commandstats(admin)
        server_side = {
            name: after[name] - before.get(name, 0)
            for name in after
            if after[name] != before.get(name, 0) and name != "info"
        }
        per_request = counted / count
        log(
            f"  {count} touch-free requests: {counted} client round trips "
            f"({per_request:.3f}/request); Redis commandstats delta: {server_side}"
        )
        iterations = 200 if quick else 1000
        paired = await paired_async(
            lambda: cost_of(in_memory, memory_scope, REQUEST, iterations),
            lambda: cost_of(on_redis, redis_scope, REQUEST, iterations),
            5 if quick else 15,
        )
        memory_rps = 1 / sorted(paired.a)[len(paired.a) // 2]
        redis_rps = 1 / sorted(paired.b)[len(paired.b) // 2]
        log(
            f"  requests/s: memory store {memory_rps:.0f}, Redis store {redis_rps:.0f} "
            f"(memory/Redis {paired.ratio:.2f}x); {spread(paired.ratios)}"
        )
    finally:
        await on_redis.shutdown()
        await in_memory.shutdown()
        admin.close()
    return [
        Result(
            "6. Redis round trips per touch-free request",
            per_request,
            "<= 1",
            f"{counted} round trips / {count} requests (client-side count); "
            f"server commandstats delta {server_side}",
            unit="",
        ),
        Result(
            "6'. requests/s, Redis store / memory store",
            1 / paired.ratio,
            "info",
            f"memory {memory_rps:.0f} req/s, Redis {redis_rps:.0f} req/s (in-process ASGI, "
            f"trivial inner app); {spread([1 / r for r in paired.ratios])}",
        ),
    ]


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[6] Redis store (real redis-server on loopback)")
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            results = asyncio.run(run(args.quick, server.url))
        finally:
            server.stop()
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
