"""``initialize`` is worked out once per server, not once per session: every session gets what
the SDK's kernel would answer it at that moment (the server may change in between), and is
refused as the kernel refuses it."""

from __future__ import annotations

from typing import Any

import httpx
import mcp_types.methods as sdk_methods
import pytest
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import MCPServer
from mcp.types import EmptyResult, ServerCapabilities, SetLevelRequestParams
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.mcp_hosting.initialize import InitOptionsCache

from .inner_apps import HostApp
from .messages import INITIALIZE, MCP_HEADERS, PROTOCOL, answer_of

pytestmark = pytest.mark.anyio


async def post_initialize(middleware: MCPSessionMiddleware, params: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.post("/mcp", json={**INITIALIZE, "params": params}, headers=MCP_HEADERS)


async def initialize(middleware: MCPSessionMiddleware, **params: Any) -> dict[str, Any]:
    response = await post_initialize(middleware, {**INITIALIZE["params"], **params})
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


class Watching:
    """A host's server middleware: it sees what the kernel answers."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        result = await call_next(ctx)
        self.seen.append(ctx.method)
        return result


@pytest.fixture
def sieved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The results the kernel made and sieved, by method."""
    made: list[str] = []
    sieve = sdk_methods.serialize_server_result

    def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        made.append(method)
        return sieve(method, *args, **kwargs)

    monkeypatch.setattr(sdk_methods, "serialize_server_result", counted)
    return made


def reference(name: str) -> tuple[MCPSessionMiddleware, Watching]:
    """A server the kernel answers itself every time (a host's middleware is in its chain)."""
    server = MCPServer(name, instructions="Be brief.")
    watching = Watching()
    server._lowlevel_server.middleware.append(watching)
    return hosted(server), watching


@pytest.mark.parametrize("requested", [*sorted(HANDSHAKE_PROTOCOL_VERSIONS), "1999-01-01"])
async def test_every_version_is_answered_as_the_kernel_answers_it(
    requested: str, sieved: list[str]
) -> None:
    ours = hosted(MCPServer("same", instructions="Be brief."))
    theirs, watching = reference("same")
    kernel = [await initialize(theirs, protocolVersion=requested) for _ in range(2)]
    assert watching.seen == ["initialize"] * 2 and sieved == ["initialize"] * 2
    sieved.clear()
    answers = [await initialize(ours, protocolVersion=requested) for _ in range(3)]
    await ours.shutdown()
    await theirs.shutdown()
    assert answers == kernel + kernel[:1]
    assert answers[0]["protocolVersion"] in HANDSHAKE_PROTOCOL_VERSIONS
    assert sieved == ["initialize"]  # the first one only: the others are its copies


BAD_PARAMS: list[Any] = [
    {"protocolVersion": PROTOCOL, "capabilities": {}},
    {"protocolVersion": 7, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    {"protocolVersion": PROTOCOL, "capabilities": [], "clientInfo": {"name": "raw"}},
    {},
    None,
]


@pytest.mark.parametrize("params", BAD_PARAMS)
async def test_a_bad_initialize_is_refused_as_the_kernel_refuses_it(params: Any) -> None:
    ours = hosted(MCPServer("same"))
    theirs, _ = reference("same")
    await initialize(ours)  # its answer is kept: the bad one must not get it
    refused = await post_initialize(ours, params)
    expected = await post_initialize(theirs, params)
    left = len(ours.registry)
    await ours.shutdown()
    await theirs.shutdown()
    assert (refused.status_code, answer_of(refused)) == (expected.status_code, answer_of(expected))
    assert "error" in answer_of(refused)
    assert left == 1  # the refused request left no session behind


async def test_each_session_keeps_its_own_handshake() -> None:
    middleware = hosted(MCPServer("same"))
    for name in ("first", "second"):
        await initialize(middleware, clientInfo={"name": name, "version": "1"})
    handshakes = sorted(state.handshake or "" for state in middleware.registry.live_sessions())
    await middleware.shutdown()
    assert len(handshakes) == 2
    assert '"name":"first"' in handshakes[0] and '"name":"second"' in handshakes[1]


async def test_a_host_middleware_sees_every_initialize_the_kernel_answers(
    sieved: list[str],
) -> None:
    middleware, watching = reference("watched")
    for _ in range(3):
        await initialize(middleware)
    await middleware.shutdown()
    assert watching.seen == ["initialize"] * 3
    assert sieved == ["initialize"] * 3
