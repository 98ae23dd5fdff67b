"""A FastAPI app with routes, a lifespan, a session dependency and its own middleware, given the
ANP tools with ``app.add_middleware(ANPMiddleware, ...)``.

Run (the port must be told to the app too: the demo agent's links and the development DID
name it)::

    MCP2ANP_PORT=8000 MCP2ANP_DATA_DIR=.mcp2anp-data \
        uvicorn --factory example_app.hosts.fastapi_host:create_app --port 8000

Then: ``GET /``, ``GET /whoami``, the MCP endpoint at ``/mcp`` and the demo agent at ``/agent``.
"""

# Add ANPMiddleware LAST: add_middleware prepends, so the last one added is the outermost.
# FastAPI builds its middleware stack on the first ASGI call (the lifespan startup), so the
# ANPMiddleware instance only exists from then on: find it with ``find_anp_middleware(app)``.

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response

from mcp2anp_middleware import ANPMiddleware, SessionState, URLPolicy, session_from_request

from .common import base_url_for, data_dir_from_env, demo_agent, host_mcp_server, port_from_env


def current_session(request: Request) -> SessionState | None:
    """Dependency: the caller's MCP session; None for routes outside the ``/mcp`` prefix."""
    return session_from_request(request)


CurrentSession = Annotated[SessionState | None, Depends(current_session)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The host's own startup/shutdown, recorded in ``app.state.events``."""
    app.state.events.append("startup")
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        app.state.events.append("shutdown")


def find_anp_middleware(app: FastAPI) -> ANPMiddleware:
    """The ANPMiddleware instance FastAPI built; LookupError before the app's first ASGI call."""
    layer: Any = app.middleware_stack
    while layer is not None:
        if isinstance(layer, ANPMiddleware):
            return layer
        layer = getattr(layer, "app", None)
    raise LookupError("no ANPMiddleware built yet: the app has not been started")


def create_app(*, data_dir: Path | str | None = None, port: int | None = None) -> FastAPI:
    """``uvicorn --factory`` entry point; arguments default to ``$MCP2ANP_DATA_DIR``/``_PORT``."""
    directory = data_dir_from_env(data_dir)
    base_url = base_url_for(port_from_env(port))
    app = FastAPI(title="FastAPI host", lifespan=lifespan)
    app.state.events = []
    app.state.ready = False

    @app.get("/")
    async def home(request: Request) -> dict[str, Any]:
        return {"host": "fastapi", "ready": request.app.state.ready, "mcp": "/mcp"}

    @app.get("/whoami")
    async def whoami(session: CurrentSession) -> dict[str, str | None]:
        return {"session": session.session_id[:8] if session is not None else None}

    @app.middleware("http")
    async def host_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["X-Host"] = "fastapi"
        return response

    app.mount("/agent", demo_agent(base_url))

    app.add_middleware(
        ANPMiddleware,
        server=host_mcp_server("fastapi-host"),
        data_dir=directory,
        public_url=base_url,  # the dev DID names this address, and the app serves its document
        url_policy=URLPolicy(
            private_origins=(f"{base_url}/agent/",)
        ),  # the demo agent, and only it
        entry_url=f"{base_url}/agent/ad.json",
    )
    return app
