"""7. Session resolution on one Redis, Sentinel and Cluster, side by side: requests/s and p99.

Each deployment is real and on loopback (``tests/redis_server.py`` and
``tests/redis_deployments.py``: a master with a replica and three sentinels; three masters with
three replicas). The middleware (``MCPSessionMiddleware``, trivial inner app, as in benchmark 6)
is driven in-process with direct ASGI calls on a session created by ``initialize``; requests
are touch-free, so each resolves the session with one read of its record. What differs between
deployments is the client's routing (Sentinel: the master's address, asked once; Cluster: the
slot map), which is what this measures; creation's ``WAIT 1`` is not in the timed path.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore
from tests.redis_deployments import ClusterDeployment, SentinelDeployment
from tests.redis_server import RedisServer

from .b6_redis import REQUEST, host_app, open_session, trivial_mcp_app
from .common import Result, call_asgi, log, run_module


async def measure(url: str, count: int) -> tuple[float, float]:
    """Requests/s (sequential) and p99 latency in ms of touch-free session resolution."""
    store = RedisSessionStore.from_url(url)
    middleware = MCPSessionMiddleware(host_app, mcp_app=trivial_mcp_app, store=store)
    await middleware.startup()
    try:
        scope = await open_session(middleware)
        for _ in range(50):  # warm the connections
            await call_asgi(middleware, scope, REQUEST)
        latencies = []
        started = time.perf_counter()
        for _ in range(count):
            begin = time.perf_counter()
            answer = await call_asgi(middleware, scope, REQUEST)
            latencies.append(time.perf_counter() - begin)
            assert answer.status == 200, answer.status
        elapsed = time.perf_counter() - started
    finally:
        await middleware.shutdown()
    latencies.sort()
    return count / elapsed, latencies[int(len(latencies) * 0.99)] * 1000


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[7] Session resolution: one Redis, Sentinel, Cluster (real deployments on loopback)")
    count = 500 if args.quick else 3000
    rows: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        single = RedisServer(Path(tmp) / "single")
        sentinel = SentinelDeployment(Path(tmp) / "sentinel")
        cluster = ClusterDeployment(Path(tmp) / "cluster")
        try:
            single.start()
            sentinel.start()
            cluster.start()
            urls = {"single": single.url, "sentinel": sentinel.url, "cluster": cluster.url}
            for name, url in urls.items():
                rps, p99 = asyncio.run(measure(url, count))
                log(f"  {name}: {rps:.0f} requests/s, p99 {p99:.2f} ms ({count} requests)")
                rows.append(
                    Result(
                        f"7. resolution requests/s, {name}",
                        rps,
                        "info",
                        f"p99 {p99:.2f} ms",
                        unit=" req/s",
                    )
                )
                rows.append(Result(f"7'. resolution p99, {name}", p99, "info", "", unit=" ms"))
        finally:
            cluster.stop()
            sentinel.stop()
            single.stop()
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return rows


if __name__ == "__main__":
    run_module(main, __doc__ or "")
