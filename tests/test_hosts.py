"""The host examples (Starlette, FastAPI, Django) run for real under uvicorn with the official
MCP client: host routes, host middleware, host lifespan, MCP sessions and the cleanup loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from starlette.applications import Starlette

from example_app.hosts import fastapi_host, starlette_host
from example_app.hosts.django_host import asgi as django_asgi
from mcp2anp_middleware import ANPMiddleware

from .servers import free_port, serve

pytestmark = pytest.mark.anyio

HOST_TOOLS = {"host_session_prefix", "anp_fetchDoc", "anp_invokeOpenRPC"}


def ok(result: CallToolResult) -> Any:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def dev_did(data_dir: Path) -> str:
    document = json.loads((data_dir / "dev" / "did.json").read_text(encoding="utf-8"))
    did: str = document["id"]
    return did


@dataclass
class Recorded:
    """Mcp-Session-Id values and X-Host headers of every answer the MCP client got."""

    session_ids: list[str] = field(default_factory=list)
    x_host: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def mcp_client(base_url: str) -> AsyncIterator[tuple[Client, Recorded]]:
    recorded = Recorded()

    async def record(response: httpx2.Response) -> None:
        recorded.x_host.append(response.headers.get("x-host"))
        session_id = response.headers.get("mcp-session-id")
        if session_id and session_id not in recorded.session_ids:
            recorded.session_ids.append(session_id)

    async with httpx2.AsyncClient(event_hooks={"response": [record]}) as http:
        transport = streamable_http_client(f"{base_url}/mcp", http_client=http)
        async with Client(transport, mode="legacy") as client:
            yield client, recorded


async def check_host_routes(base_url: str, x_host: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url) as http:
        home = await http.get("/")
        assert home.status_code == 200
        assert home.headers["x-host"] == x_host
        assert home.json()["host"] == x_host
        whoami = await http.get("/whoami")
        assert whoami.status_code == 200 and whoami.headers["x-host"] == x_host
        assert whoami.json()["session"] is None
        body: dict[str, Any] = home.json()
        return body


async def check_mcp(base_url: str, middleware: ANPMiddleware, data_dir: Path) -> None:
    async with mcp_client(base_url) as (client, recorded):
        assert len(recorded.session_ids) == 1  # minted on initialize
        session_id = recorded.session_ids[0]
        assert len(middleware.registry) == 1
        assert session_id in middleware.registry

        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names >= HOST_TOOLS

        # A host tool reads the session with session_from_request: it is under /mcp.
        assert ok(await client.call_tool("host_session_prefix", {})) == {"result": session_id[:8]}

        # A host route outside the prefix never gets a session, even when sent a valid id.
        async with httpx.AsyncClient(base_url=base_url) as http:
            whoami = await http.get("/whoami", headers={"Mcp-Session-Id": session_id})
        assert whoami.json()["session"] is None

        # The ANP tools work offline against the demo agent the host serves at /agent.
        ad = ok(await client.call_tool("anp_fetchDoc", {"url": f"{base_url}/agent/ad.json"}))
        assert ad["status"] == 200
        assert ad["document"]["@type"] == "ad:AgentDescription"
        who = ok(
            await client.call_tool(
                "anp_invokeOpenRPC", {"endpoint": f"{base_url}/agent/rpc", "method": "whoami"}
            )
        )
        assert who["result"]["did"] == dev_did(data_dir)  # signed with the dev-mode DID

        # /mcp answers come from ANPMiddleware: the host's own middleware never sees them.
        assert recorded.x_host and set(recorded.x_host) == {None}
    assert len(middleware.registry) == 0  # the client's DELETE on close ended the session


# -- Starlette -----------------------------------------------------------------------------------


async def test_starlette_host(tmp_path: Path) -> None:
    port = free_port()
    app = starlette_host.create_app(data_dir=tmp_path, port=port)
    host_app = app.app
    assert isinstance(host_app, Starlette)
    assert host_app.state.events == [] and not app.background.running

    async with serve(app, port=port) as base_url:
        assert app.background.running
        assert host_app.state.events == ["startup"]
        home = await check_host_routes(base_url, "starlette")
        assert home["ready"] is True
        await check_mcp(base_url, app, tmp_path)
        assert app.background.running

    assert not app.background.running
    assert host_app.state.events == ["startup", "shutdown"]
    assert host_app.state.ready is False


async def test_starlette_factory_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP2ANP_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("MCP2ANP_PORT", "8123")
    app = starlette_host.create_app()  # what `uvicorn --factory` calls
    assert isinstance(app, ANPMiddleware)
    assert (tmp_path / "env-data" / "dev" / "did.json").is_file()
    assert app.toolkit.instructions().count("http://127.0.0.1:8123/agent/ad.json") >= 1


# -- FastAPI -------------------------------------------------------------------------------------


async def test_fastapi_host_with_add_middleware(tmp_path: Path) -> None:
    port = free_port()
    app = fastapi_host.create_app(data_dir=tmp_path, port=port)
    with pytest.raises(LookupError):
        fastapi_host.find_anp_middleware(app)  # FastAPI builds the stack on its first call
    assert app.state.events == []

    async with serve(app, port=port) as base_url:
        middleware = fastapi_host.find_anp_middleware(app)
        assert middleware.background.running  # lifespan reached the middleware
        assert app.state.events == ["startup"]  # ... and was forwarded to FastAPI's lifespan
        home = await check_host_routes(base_url, "fastapi")
        assert home["ready"] is True
        await check_mcp(base_url, middleware, tmp_path)
        assert fastapi_host.find_anp_middleware(app) is middleware  # built once
        assert middleware.background.running

    assert not middleware.background.running
    assert app.state.events == ["startup", "shutdown"]


async def test_fastapi_host_in_process(tmp_path: Path) -> None:
    from asgi_lifespan import LifespanManager

    app = fastapi_host.create_app(data_dir=tmp_path, port=free_port())
    async with LifespanManager(app) as manager:
        middleware = fastapi_host.find_anp_middleware(app)
        assert middleware.background.running and app.state.events == ["startup"]
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            whoami = await http.get("/whoami")
        assert whoami.json() == {"session": None}  # the dependency, outside the prefix
        assert whoami.headers["x-host"] == "fastapi"
    assert not middleware.background.running
    assert app.state.events == ["startup", "shutdown"]


# -- Django --------------------------------------------------------------------------------------


async def test_django_host_without_lifespan_support(tmp_path: Path) -> None:
    port = free_port()
    app = django_asgi.create_application(data_dir=tmp_path, port=port)
    assert not app.background.running

    async with serve(app, port=port) as base_url:
        # Django raised on lifespan; the middleware completed startup itself.
        assert app.background.running
        home = await check_host_routes(base_url, "django")
        assert home["mcp"] == "/mcp"
        async with httpx.AsyncClient(base_url=base_url) as http:
            whoami = await http.get("/whoami")
            assert whoami.json()["asgi_scope"] == "http"  # a real ASGIRequest with .scope
            missing = await http.get("/nowhere")
            assert missing.status_code == 404 and missing.headers["x-host"] == "django"
            agent = await http.get("/agent/ad.json")  # the demo agent, routed beside Django
            assert agent.status_code == 200 and "x-host" not in agent.headers
        await check_mcp(base_url, app, tmp_path)
        assert app.background.running

    assert not app.background.running  # ... and shutdown too


async def test_django_is_configured_once_per_process(tmp_path: Path) -> None:
    from django.conf import settings  # type: ignore[import-untyped]

    first = django_asgi.create_application(data_dir=tmp_path / "a", port=free_port())
    second = django_asgi.create_application(data_dir=tmp_path / "b", port=free_port())
    assert first is not second
    assert settings.configured
    assert settings.ROOT_URLCONF == "example_app.hosts.django_host.urls"
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.dummy"  # no database


async def test_django_conventional_application_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP2ANP_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(django_asgi, "_application", None)
    application = django_asgi.application  # built on first access, from the environment
    assert isinstance(application, ANPMiddleware)
    assert django_asgi.application is application
    assert (tmp_path / "dev" / "did.json").is_file()
    with pytest.raises(AttributeError):
        _ = django_asgi.no_such_name
