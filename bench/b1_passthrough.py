"""1. Pass-through overhead: a request outside the MCP prefix, wrapped vs unwrapped.

Both sides are driven in-process with direct ASGI calls (prebuilt scope, a receive that delivers
an empty body, a send that discards). Host apps: a FastAPI app with a JSON route (the kind of app
the middleware is meant to wrap; this row is the target), a one-route Starlette app, and a bare
ASGI callable that only sends a response (the worst case: the middleware's fixed cost against an
app that does nothing). An empty pass-through middleware (``await self.app(...)`` and nothing
else) is measured the same way, as the floor any ASGI middleware layer costs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mcp2anp_middleware import MCPSessionMiddleware

from .common import Result, call_asgi, cost_of, http_scope, log, paired_async, run_module, spread


async def bare_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def health(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/health", health), Route("/", health)])


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health_json() -> dict[str, str]:
        return {"status": "ok"}

    return app


class EmptyMiddleware:
    """The floor: a middleware layer that does nothing but call the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def measure(
    app: Any, label: str, iterations: int, rounds: int, *, wrapper: Any = MCPSessionMiddleware
) -> tuple[Result, float]:
    wrapped = wrapper(app)
    scope = http_scope("GET", "/health")
    for target in (app, wrapped):
        answer = await call_asgi(target, scope)
        assert answer.status == 200 and answer.body in (b"ok", b'{"status":"ok"}'), answer.status
    paired = await paired_async(
        lambda: cost_of(app, scope, b"", iterations),
        lambda: cost_of(wrapped, scope, b"", iterations),
        rounds,
    )
    bare_us = sorted(paired.a)[len(paired.a) // 2] * 1e6
    added_ns = (paired.ratio - 1) * bare_us * 1000
    log(
        f"  {label}: unwrapped {bare_us:.2f} us/request, ratio {paired.ratio:.4f} "
        f"(~{added_ns:.0f} ns added), paired ratios {spread(paired.ratios)}"
    )
    detail = f"{bare_us:.2f} us/req unwrapped, ~{added_ns:.0f} ns added; {spread(paired.ratios)}"
    return Result(label, paired.ratio, "<= 1.03", detail), added_ns


async def run(quick: bool) -> list[Result]:
    scale = 5 if quick else 1
    rounds = 31 // scale + 4
    log("[1] pass-through overhead (outside /mcp), in-process ASGI, perf_counter")
    fastapi_row, _ = await measure(
        fastapi_app(), "1. pass-through, FastAPI host app", 1000 // scale, rounds
    )
    starlette_row, _ = await measure(
        starlette_app(), "1a. pass-through, Starlette one-route app", 2000 // scale, rounds
    )
    bare_row, added = await measure(
        bare_app, "1b. pass-through, bare ASGI app (worst case)", 20000 // scale, rounds
    )
    _, floor = await measure(
        bare_app, "(floor) empty middleware, bare ASGI app", 20000 // scale, rounds,
        wrapper=EmptyMiddleware,
    )  # fmt: skip
    bare_row.target = "info"
    bare_row.detail += f"; an empty middleware layer adds ~{floor:.0f} ns"
    log(f"  MCPSessionMiddleware adds ~{added:.0f} ns; an empty middleware layer ~{floor:.0f} ns")
    return [fastapi_row, starlette_row, bare_row]


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    results = asyncio.run(run(args.quick))
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
