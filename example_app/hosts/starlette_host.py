"""A Starlette app with its own routes, lifespan and middleware, wrapped in ANPMiddleware.

Run (the port must be told to the app too: the demo agent's links and the development DID
name it)::

    MCP2ANP_PORT=8000 MCP2ANP_DATA_DIR=.mcp2anp-data \
        uvicorn --factory example_app.hosts.starlette_host:create_app --port 8000

Then: ``GET /``, ``GET /whoami``, the MCP endpoint at ``/mcp`` and the demo agent at ``/agent``.
"""

# The host app is built as usual; the only ANP line is ``ANPMiddleware(host_app, ...)``.
# ANPMiddleware is outermost: /mcp never reaches the host's own middleware or routes.
# Host routes therefore always see ``session_from_request(request) is None``.

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp2anp_middleware import ANPMiddleware, URLPolicy, session_from_request

from .common import base_url_for, data_dir_from_env, demo_agent, host_mcp_server, port_from_env


class HostHeaderMiddleware:
    """The host's own pure-ASGI middleware: adds ``X-Host`` to every response it sees."""

    def __init__(self, app: ASGIApp, value: str = "starlette") -> None:
        self.app = app
        self.value = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Host", self.value)
            await send(message)

        await self.app(scope, receive, send_with_header)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The host's own startup/shutdown, recorded in ``app.state.events``."""
    app.state.events.append("startup")
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        app.state.events.append("shutdown")


async def home(request: Request) -> JSONResponse:
    return JSONResponse(
        {"host": "starlette", "ready": request.app.state.ready, "mcp": "/mcp", "agent": "/agent"}
    )


async def whoami(request: Request) -> JSONResponse:
    session = session_from_request(request)  # None here: /whoami is outside the /mcp prefix
    return JSONResponse({"session": session.session_id[:8] if session is not None else None})


def create_host_app(*, base_url: str) -> Starlette:
    """The pre-existing app, knowing nothing of MCP (except the demo agent it serves)."""
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/whoami", whoami),
            Mount("/agent", app=demo_agent(base_url)),
        ],
        middleware=[Middleware(HostHeaderMiddleware, value="starlette")],
        lifespan=lifespan,
    )
    app.state.events = []
    app.state.ready = False
    return app


def create_app(*, data_dir: Path | str | None = None, port: int | None = None) -> ANPMiddleware:
    """``uvicorn --factory`` entry point; arguments default to ``$MCP2ANP_DATA_DIR``/``_PORT``."""
    directory = data_dir_from_env(data_dir)
    base_url = base_url_for(port_from_env(port))
    host_app = create_host_app(base_url=base_url)
    app = ANPMiddleware(
        host_app,
        server=host_mcp_server("starlette-host"),
        data_dir=directory,
        public_url=base_url,  # the dev DID names this address, and the app serves its document
        url_policy=URLPolicy(
            private_origins=(f"{base_url}/agent/",)
        ),  # the demo agent, and only it
        entry_url=f"{base_url}/agent/ad.json",
    )
    return app
