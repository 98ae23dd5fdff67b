"""``initialize`` is worked out once per server, not once per session: every session gets what
the SDK's kernel would answer it at that moment (the server may change in between), and is
refused as the kernel refuses it."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import mcp_types.methods as sdk_methods
import pytest
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage
from mcp.types import EmptyResult, ServerCapabilities, SetLevelRequestParams
from mcp_types import INTERNAL_ERROR, METHOD_NOT_FOUND, JSONRPCRequest
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from mcp2anp_middleware import MCPSessionMiddleware
from mcp2anp_middleware.mcp_hosting import live_session as live_session_module
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
    made: list[int] = []
    make = Server.create_initialization_options

    def counted(self: Server[Any], *args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return make(self, *args, **kwargs)

    monkeypatch.setattr(Server, "create_initialization_options", counted)  # (still the SDK's)
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


def test_an_object_that_makes_its_own_options_makes_them_every_time() -> None:
    lowlevel = MCPServer("own")._lowlevel_server
    cache = InitOptionsCache(lowlevel)
    assert cache.current() is not None
    lowlevel.get_capabilities = lambda *args, **kwargs: ServerCapabilities()  # type: ignore[method-assign]
    assert cache.current() is None


async def test_one_server_answers_each_version_with_its_own() -> None:
    middleware = hosted(MCPServer("versions", instructions="Be brief."))
    theirs, _ = reference("versions")
    older = sorted(HANDSHAKE_PROTOCOL_VERSIONS)[0]
    order = [PROTOCOL, older, PROTOCOL, older]
    answers = [await initialize(middleware, protocolVersion=version) for version in order]
    kernel = [await initialize(theirs, protocolVersion=version) for version in order]
    await middleware.shutdown()
    await theirs.shutdown()
    assert [answer["protocolVersion"] for answer in answers] == order
    assert answers == kernel


async def test_answers_are_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each answer is a new object: changing one (a host's code may) changes no later one."""
    seen: list[dict[str, Any]] = []
    answer_json = live_session_module._answer_json

    def keeping(request_id: Any, result: dict[str, Any]) -> str:
        seen.append(result)
        return answer_json(request_id, result)

    monkeypatch.setattr(live_session_module, "_answer_json", keeping)
    middleware = hosted(MCPServer("copies"))
    await initialize(middleware)  # the kernel's answer
    for changed in range(2):  # then copies of it
        seen[changed]["capabilities"]["tools"]["listChanged"] = True
        seen[changed]["serverInfo"]["name"] = "changed"
        later = await initialize(middleware)
        assert later["capabilities"]["tools"] == {"listChanged": False}
        assert later["serverInfo"]["name"] == "copies"
    await middleware.shutdown()


async def test_the_kernels_request_check_runs_before_a_copy_is_handed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request's surface validation is the kernel's own function, with its errors: made
    to refuse a request (as it refuses a method a version does not have), it refuses it here
    too, though an answer for the same version is kept."""
    middleware = hosted(MCPServer("checked"))
    theirs, _ = reference("checked")
    await initialize(middleware)
    check = sdk_methods.validate_client_request

    def refusing(method: str, version: str, params: Any, **kwargs: Any) -> None:
        if params and params.get("clientInfo", {}).get("name") == "refused":
            raise KeyError((method, version))
        check(method, version, params, **kwargs)

    monkeypatch.setattr(sdk_methods, "validate_client_request", refusing)
    params = {**INITIALIZE["params"], "clientInfo": {"name": "refused", "version": "1"}}
    refused = await post_initialize(middleware, params)
    expected = await post_initialize(theirs, params)
    await middleware.shutdown()
    await theirs.shutdown()
    assert answer_of(refused) == answer_of(expected)
    assert answer_of(refused)["error"]["code"] == METHOD_NOT_FOUND


async def test_a_host_middleware_that_edits_the_server_is_seen_at_once() -> None:
    server = MCPServer("edited", instructions="v0")
    lowlevel = server._lowlevel_server
    edits = 0

    async def edit(ctx: Any, call_next: Any) -> Any:
        nonlocal edits
        if ctx.method == "initialize":
            edits += 1
            lowlevel.instructions = f"v{edits}"
        return await call_next(ctx)

    lowlevel.middleware.append(edit)
    middleware = hosted(server)
    answers = [await initialize(middleware) for _ in range(2)]
    await middleware.shutdown()
    assert [answer["instructions"] for answer in answers] == ["v1", "v2"]


async def test_servers_sharing_a_middleware_list_answer_each_as_itself() -> None:
    alpha, beta = MCPServer("alpha"), MCPServer("beta")
    beta._lowlevel_server.middleware = alpha._lowlevel_server.middleware
    names = []
    for server in (alpha, beta, alpha, beta):
        middleware = hosted(server)
        names.append((await initialize(middleware))["serverInfo"]["name"])
        await middleware.shutdown()
    assert names == ["alpha", "beta", "alpha", "beta"]


async def sdk_initialize(server: MCPServer, options: Any) -> dict[str, Any]:
    """``initialize`` through the SDK's own loop (``Server.run``) with options of its own."""
    lowlevel = server._lowlevel_server
    to_server, server_reads = anyio.create_memory_object_stream[Any](10)
    server_writes, from_server = anyio.create_memory_object_stream[Any](10)
    request = JSONRPCRequest(jsonrpc="2.0", id=1, method="initialize", params=INITIALIZE["params"])
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lowlevel.run, server_reads, server_writes, options)
        await to_server.send(SessionMessage(request))
        answer = await from_server.receive()
        tasks.cancel_scope.cancel()
    result: dict[str, Any] = answer.message.result
    return result


@pytest.mark.parametrize("hosted_first", [True, False])
async def test_the_sdks_own_loop_on_the_same_server_answers_with_its_own_options(
    hosted_first: bool,
) -> None:
    server = MCPServer("shared")
    options = server._lowlevel_server.create_initialization_options(
        NotificationOptions(tools_changed=True)
    )
    middleware = hosted(server)
    if hosted_first:
        ours = await initialize(middleware)
        theirs = await sdk_initialize(server, options)
    else:
        theirs = await sdk_initialize(server, options)
        ours = await initialize(middleware)
    ours_again = await initialize(middleware)
    theirs_again = await sdk_initialize(server, options)
    await middleware.shutdown()
    assert (
        ours["capabilities"]["tools"]
        == ours_again["capabilities"]["tools"]
        == {"listChanged": False}
    )
    assert (
        theirs["capabilities"]["tools"]
        == theirs_again["capabilities"]["tools"]
        == {"listChanged": True}
    )


async def test_an_answer_that_is_not_json_fails_as_the_kernels_does() -> None:
    ours = hosted(MCPServer("broken"))
    theirs, _ = reference("broken")
    for app in (ours, theirs):
        endpoint = app.mcp_app
        assert isinstance(endpoint, MCPEndpoint)
        endpoint.lowlevel.instructions = "bad \ud800 text"  # (a lone surrogate: no JSON has it)
    refused = await post_initialize(ours, INITIALIZE["params"])
    expected = await post_initialize(theirs, INITIALIZE["params"])
    left = len(ours.registry)
    await ours.shutdown()
    await theirs.shutdown()
    assert (refused.status_code, answer_of(refused)) == (expected.status_code, answer_of(expected))
    assert answer_of(refused)["error"] == {"code": INTERNAL_ERROR, "message": "Internal error"}
    assert left == 0
