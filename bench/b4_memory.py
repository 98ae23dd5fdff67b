"""4. Memory per idle session (no tool call yet), with tracemalloc.

This package: 100,000 sessions are created and registered (``new_session`` + ``register``) in a
``SessionRegistry`` with the in-memory store, all for one principal sharing one ``SessionConfig``
(as sessions of one credential do). Per-session bytes = growth of tracemalloc's traced memory /
100,000; it includes the session id string, the ``SessionState`` and the store's index entries
(dict and ``OrderedDict`` slots, amortised over their growth).

For context: the same sessions after their first tool call (the per-session ``SessionCrawler``,
signer and handler, credential shared via the process's ``CredentialCache``), and the official
SDK's own stateful mode: N ``initialize`` requests driven in-process against
``MCPServer.streamable_http_app(stateless_http=False)`` with its session manager running, each
leaving a live session (transport, streams, server task) behind. The seed's figure (~1 KB per
``SessionState`` plus 10-100 KB per anp crawler) is its own claim, printed as a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import tempfile
import time
import tracemalloc

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from example_app.demo_agent import create_demo_identity
from mcp2anp_middleware import ANPToolkit, SessionConfig
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.registry import SessionRegistry

from .common import INITIALIZE, MCP_HEADERS, Result, call_asgi, http_scope, log, run_module

LIMIT = 1024


async def package_sessions(count: int) -> tuple[float, SessionRegistry]:
    registry = SessionRegistry(clock=ManualClock())
    config = SessionConfig(principal="bench")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(count):
        await registry.register(registry.new_session(config))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(registry) == count
    return (after - before) / count, registry


def after_first_call(count: int) -> float:
    """Bytes added per session by its first tool call (crawler + signer + handler)."""
    with tempfile.TemporaryDirectory() as tmp:
        identity = create_demo_identity(tmp, "bench", port=9880)
        config = SessionConfig(
            principal="bench",
            did_document_path=identity.did_document_path,
            private_key_path=identity.private_key_path,
        )
        toolkit = ANPToolkit()
        registry = SessionRegistry(clock=ManualClock())
        states = [registry.new_session(config) for _ in range(count)]
        toolkit.credentials.get(config)  # loaded once per credential, at authentication
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for state in states:
            toolkit.handler_for(state)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return (after - before) / count


async def hosted_sessions(count: int) -> float:
    """Bytes per idle session made by a real ``initialize`` through ``ANPMiddleware`` (memory
    store): the session's state, its store record and its handshake, with the MCP machinery of
    the request released. Identical handshakes share one interned string."""
    from starlette.applications import Starlette

    from mcp2anp_middleware import ANPMiddleware

    with tempfile.TemporaryDirectory() as tmp:
        app = ANPMiddleware(Starlette(), data_dir=tmp)
        scope = http_scope("POST", "/mcp", MCP_HEADERS)
        for _ in range(20):  # warm up the lazily started middleware and SDK state
            await call_asgi(app, scope, INITIALIZE)
        for _ in range(100):
            await asyncio.sleep(0)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            answer = await call_asgi(app, scope, INITIALIZE)
            assert answer.status == 200, answer.body
        app.endpoint.release_idle(math.inf)  # past the warm period of the last requests
        for _ in range(100 * count):  # released machinery unwinds within a few loop turns each
            if not app.endpoint.running:
                break
            await asyncio.sleep(0)
        assert not app.endpoint.running, app.endpoint.running
        for _ in range(100):  # the loop's own housekeeping, as in any running server (it
            await asyncio.sleep(0)  # purges the cancelled timers of the requests' timeouts)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(app.registry) >= count
        await app.shutdown()
        return (after - before) / count


async def sdk_stateful_sessions(count: int) -> float:
    logging.getLogger("mcp").setLevel(logging.WARNING)
    server = MCPServer("bench")

    @server.tool()
    def ping() -> str:
        return "pong"

    app = server.streamable_http_app(
        stateless_http=False,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    body = INITIALIZE
    scope = http_scope("POST", "/mcp", MCP_HEADERS)
    async with server.session_manager.run():
        for _ in range(20):  # warm up lazily created module state before measuring
            await call_asgi(app, scope, body)
        await asyncio.sleep(0.05)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        ids = set()
        for _ in range(count):
            answer = await call_asgi(app, scope, body)
            assert answer.status == 200, answer.body
            ids.add(answer.header(b"mcp-session-id"))
        await asyncio.sleep(0.2)  # let each session's server task reach its idle wait
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(ids) == count
        return (after - before) / count


async def run(quick: bool) -> list[Result]:
    count = 20_000 if quick else 100_000
    per_session, registry = await package_sessions(count)
    del registry
    gc.collect()
    log(f"  this package, idle session: {per_session:.0f} B/session over {count:,} sessions")
    hosted_count = 2000 if quick else 10_000
    hosted = await hosted_sessions(hosted_count)
    log(f"  this package, idle session after a real initialize: {hosted:.0f} B/session")
    first_call = after_first_call(2000 if quick else 10_000)
    log(f"  + first tool call (crawler, signer, handler): +{first_call:.0f} B/session")
    sdk_count = 100 if quick else 400
    sdk = await sdk_stateful_sessions(sdk_count)
    log(f"  official SDK stateful mode: {sdk / 1024:.1f} KB/session over {sdk_count} sessions")
    log("  seed (its own claim): ~1 KB SessionState + 10-100 KB anp crawler per session")
    return [
        Result(
            "4h. idle session after initialize, handshake kept (bytes/session)",
            hosted,
            f"<= {LIMIT}",
            f"{hosted_count:,} initialize requests through ANPMiddleware, machinery released",
            unit=" B",
        ),
        Result(
            "4. idle session memory (bytes/session)",
            per_session,
            f"<= {LIMIT}",
            f"tracemalloc over {count:,} sessions; after first tool call +{first_call:.0f} B; "
            f"SDK stateful {sdk / 1024:.1f} KB/session (measured, {sdk_count} sessions); "
            "seed ~1 KB + 10-100 KB crawler (its claim)",
            unit=" B",
        ),
        Result(
            "4'. SDK stateful session (bytes/session, measured)",
            sdk,
            "info",
            f"{sdk_count} initialize requests in-process; reference figure ~37 KB",
            unit=" B",
        ),
    ]


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[4] memory per session (tracemalloc)")
    results = asyncio.run(run(args.quick))
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
