"""The ``initialize`` payload is made once per server, not once per session: every session gets
what the SDK would make for it at that moment, even after the server changed in between."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import MCPServer
from mcp.types import EmptyResult, ServerCapabilities, SetLevelRequestParams

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.mcp_hosting.init_options import InitOptionsCache

from .inner_apps import HostApp
from .messages import INITIALIZE, MCP_HEADERS, answer_of

pytestmark = pytest.mark.anyio


async def initialize(middleware: MCPSessionMiddleware) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert response.status_code == 200
    result: dict[str, Any] = answer_of(response)["result"]
    return result


def hosted(server: MCPServer) -> MCPSessionMiddleware:
    endpoint = MCPEndpoint(server)
    return MCPSessionMiddleware(HostApp(), mcp_app=endpoint, services=[endpoint.service])


def made_by_sdk(server: MCPServer) -> dict[str, Any]:
    """What the SDK's own kernel answers with: its options, dumped as the wire has them (this
    era's capabilities have no ``extensions``)."""
    options = server._lowlevel_server.create_initialization_options()
    dumped = options.capabilities.model_dump(by_alias=True, mode="json", exclude_none=True)
    dumped.pop("extensions", None)
    return dumped


async def test_sessions_share_one_payload_while_the_server_stays_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = MCPServer("same", instructions="Be brief.")
    lowlevel = server._lowlevel_server
    made: list[int] = []
    make = lowlevel.create_initialization_options

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(lowlevel, "create_initialization_options", counted)
    middleware = hosted(server)
    first, second = await initialize(middleware), await initialize(middleware)
    await middleware.shutdown()
    assert len(made) == 1
    assert first == second
    assert first["capabilities"] == made_by_sdk(server)
    assert first["instructions"] == "Be brief."
    assert first["serverInfo"]["name"] == "same"


async def test_a_handler_added_later_shows_in_the_next_session() -> None:
    server = MCPServer("growing")
    middleware = hosted(server)
    before = await initialize(middleware)
    assert "logging" not in before["capabilities"]

    async def set_level(ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    server._lowlevel_server.add_request_handler(
        "logging/setLevel", SetLevelRequestParams, set_level
    )
    after = await initialize(middleware)
    await middleware.shutdown()
    assert after["capabilities"]["logging"] == {}
    assert after["capabilities"] == made_by_sdk(server)


async def test_an_edited_identity_shows_in_the_next_session() -> None:
    server = MCPServer("before")
    lowlevel = server._lowlevel_server
    middleware = hosted(server)
    await initialize(middleware)
    lowlevel.name = "after"
    lowlevel.instructions = "New rules."
    changed = await initialize(middleware)
    await middleware.shutdown()
    assert changed["serverInfo"]["name"] == "after"
    assert changed["instructions"] == "New rules."


def test_extensions_edited_in_place_are_seen() -> None:
    """(The handshake era's capabilities carry no extensions: checked on the options.)"""
    lowlevel = MCPServer("extended")._lowlevel_server
    cache = InitOptionsCache(lowlevel)
    first = cache.current()
    assert first is not None and cache.current() is first
    lowlevel.extensions["io.example/ext"] = {"level": 1}
    added = cache.current()
    lowlevel.extensions["io.example/ext"]["level"] = 2  # a nested edit, in place
    nested = cache.current()
    assert added is not None and nested is not None
    assert added.capabilities.extensions == {"io.example/ext": {"level": 1}}
    assert nested.capabilities.extensions == {"io.example/ext": {"level": 2}}


async def test_a_server_class_that_makes_its_own_options_makes_them_every_time() -> None:
    server = MCPServer("own")
    lowlevel = server._lowlevel_server
    calls: list[int] = []

    class Announcing(type(lowlevel)):  # type: ignore[misc]
        def get_capabilities(self, *args: Any, **kwargs: Any) -> ServerCapabilities:
            calls.append(1)
            notifications = NotificationOptions(tools_changed=len(calls) > 1)
            made: ServerCapabilities = super().get_capabilities(notifications, *args[1:], **kwargs)
            return made

    lowlevel.__class__ = Announcing
    assert InitOptionsCache(lowlevel).current() is None
    middleware = hosted(server)
    first, second = await initialize(middleware), await initialize(middleware)
    await middleware.shutdown()
    assert first["capabilities"]["tools"] == {"listChanged": False}
    assert second["capabilities"]["tools"] == {"listChanged": True}
    assert len(calls) == 2
