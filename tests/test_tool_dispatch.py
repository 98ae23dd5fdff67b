"""The direct ``tools/call`` route to the ANP tools answers exactly as :class:`MCPServer`'s own
route does, is skipped for any tool the host owns or replaced, and is not installed under an
extension that intercepts tool calls."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import mcp_types.methods as sdk_methods
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, ToolBinding
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolRequestParams, CallToolResult, TextContent
from mcp_types.methods import SERVER_RESULTS, serialize_server_result
from pydantic import Field, ValidationError, model_validator

from mcp2anp_middleware import ANPToolkit
from mcp2anp_middleware.anp_tools.dispatch import (
    _Arguments,
    _text_block_model,
    _typed_text,
    install_direct_route,
)

from .anp_stack import API_KEYS, anp_stack
from .tool_results import ok

pytestmark = pytest.mark.anyio

ALICE = next(iter(API_KEYS))


def wire(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


@pytest.fixture
def contexts_made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Counts the ``Context`` objects :class:`MCPServer`'s route makes (one per call it runs)."""
    made: list[str] = []
    original = Context.__init__

    def counting(self: Any, **kwargs: Any) -> None:
        made.append("context")
        original(self, **kwargs)

    monkeypatch.setattr(Context, "__init__", counting)
    yield made


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # 2025-11-25, then 2026-07-28
async def test_both_routes_answer_alike(
    tmp_path: Path, contexts_made: list[str], mode: str
) -> None:
    async with anp_stack(tmp_path) as stack:
        endpoint = f"{stack.base_url}/agent/rpc"
        calls: list[tuple[str, dict[str, Any]]] = [
            ("anp_fetchDoc", {"url": stack.ad_url}),
            ("anp_invokeOpenRPC", {"endpoint": endpoint, "method": "whoami", "request_id": 7}),
            (
                "anp_invokeOpenRPC",
                {"endpoint": endpoint, "method": "add", "params": [2, 3], "request_id": 8},
            ),
            # a client that sends JSON inside a string: pre-parsed on both routes
            (
                "anp_invokeOpenRPC",
                {"endpoint": endpoint, "method": "add", "params": "[4, 5]", "request_id": 9},
            ),
            ("anp_invokeOpenRPC", {"endpoint": endpoint, "method": "nope", "request_id": "r"}),
            ("anp_fetchDoc", {"url": "file:///etc/passwd"}),
            ("anp_fetchDoc", {}),  # arguments the tool's model rejects
            ("anp_fetchDoc", {"url": 5}),
            ("anp_invokeOpenRPC", {"endpoint": endpoint, "method": "add", "request_id": [1]}),
        ]
        async with stack.client(ALICE, mode) as client:
            direct = [wire(await client.call_tool(name, arguments)) for name, arguments in calls]
        assert contexts_made == []  # MCPServer's route never ran
        for state in stack.sessions():  # the session-less era's implicit session outlives its
            await stack.middleware.registry.revoke(state.session_id)  # client: start afresh

        server = stack.middleware.mcp_server
        server._lowlevel_server.add_request_handler(
            "tools/call", CallToolRequestParams, server._handle_call_tool
        )
        async with stack.client(ALICE, mode) as client:
            ordinary = [wire(await client.call_tool(name, args)) for name, args in calls]
        assert len(contexts_made) == len(calls)

    for one, other in zip(direct, ordinary, strict=True):
        assert one == other, (one, other)
    assert [answer.get("isError") for answer in direct] == [
        False,
        False,
        False,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert json.loads(direct[3]["content"][0]["text"])["result"] == 9
    assert "Error executing tool anp_fetchDoc" in direct[6]["content"][0]["text"]


async def test_a_host_tool_and_a_replaced_tool_take_the_ordinary_route(
    tmp_path: Path, contexts_made: list[str]
) -> None:
    server = MCPServer("host-server")

    @server.tool()
    def host_status() -> str:
        """A tool of the host's own."""
        return "all good"

    async with anp_stack(tmp_path, server=server) as stack, stack.client(ALICE) as client:
        assert ok(await client.call_tool("host_status", {})) == {"result": "all good"}
        assert len(contexts_made) == 1

        server.remove_tool("anp_fetchDoc")

        @server.tool(name="anp_fetchDoc")
        def own_fetch(url: str) -> str:
            """The host's own fetch."""
            return f"host fetched {url}"

        answer = await client.call_tool("anp_fetchDoc", {"url": stack.ad_url})
        assert isinstance(answer.content[0], TextContent)
        assert answer.content[0].text == f"host fetched {stack.ad_url}"
        assert len(contexts_made) == 2


class Audit(Extension):
    """An extension that sees every tool call."""

    identifier = "com.example/audit"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def tools(self) -> list[ToolBinding]:
        return []

    async def intercept_tool_call(
        self,
        params: CallToolRequestParams,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        self.seen.append(params.name)
        return await call_next(ctx)


async def test_an_extension_that_intercepts_tool_calls_sees_the_anp_tools(
    tmp_path: Path,
) -> None:
    audit = Audit()
    server = MCPServer("host-server", extensions=[audit])
    async with anp_stack(tmp_path, server=server) as stack, stack.client(ALICE) as client:
        fetched = ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))
        assert fetched["status"] == 200
    assert audit.seen == ["anp_fetchDoc"]
    assert install_direct_route(server, {}) is False


async def test_a_subclass_that_overrides_the_tool_path_sees_every_call(tmp_path: Path) -> None:
    """A host auditing tool calls in its own ``MCPServer.call_tool`` keeps seeing the ANP tools'
    calls: the direct route is not installed under an override."""
    seen: list[str] = []

    class Audited(MCPServer):
        async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
            seen.append(name)
            return await super().call_tool(name, arguments, context)

    async with (
        anp_stack(tmp_path, server=Audited("audited")) as stack,
        stack.client(ALICE) as client,
    ):
        assert ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))["status"] == 200
    assert seen == ["anp_fetchDoc"]


async def test_an_unexpected_failure_is_answered_as_mcpserver_answers_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What escapes a tool on the direct route becomes the tool error ``MCPServer`` makes of
    it: the tool's name, no exception text for the client, the traceback in the log."""
    server = MCPServer("crashing")

    async def anp_crash(url: str) -> str:
        """Registered for its argument model; the direct route runs ``crash`` instead."""
        return url

    async def crash(ctx: Any, arguments: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("secret detail from " + arguments["url"])

    server.add_tool(anp_crash, name="anp_crash")
    assert install_direct_route(server, {"anp_crash": crash})
    entry = server._lowlevel_server.get_request_handler("tools/call")
    assert entry is not None
    params = CallToolRequestParams(name="anp_crash", arguments={"url": "http://x/"})
    answer = await entry.handler(None, params)  # type: ignore[arg-type]
    assert answer == {
        "content": [{"type": "text", "text": "Error executing tool anp_crash"}],
        "isError": True,
        "resultType": "complete",
    }
    assert any(record.exc_info for record in caplog.records)


def _outcome(validate: Any, arguments: dict[str, Any]) -> Any:
    """What a validation gives: the arguments, or the errors it raised."""
    try:
        return ("ok", validate(arguments))
    except ValidationError as exc:
        return ("rejected", exc.errors(include_url=False))


def _tools() -> list[Tool]:
    """The ANP tools and one with an aliased field, on a server of their own."""
    server = MCPServer("t")
    ANPToolkit().register(server)

    def aliased(
        plain: str,
        items: Annotated[list[int], Field(alias="itemList")] = [],  # noqa: B006
        count: int | None = None,
    ) -> str:
        return plain

    server.add_tool(aliased, name="aliased")
    return server._tool_manager.list_tools()


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_VALUES = _JSONISH | _JSONISH.map(json.dumps) | st.sampled_from(["[1, 2]", '{"a": 1}', "12", "x"])
_KEYS = st.sampled_from(
    ["url", "endpoint", "method", "params", "request_id", "plain", "items", "itemList", "count"]
)
_TOOLS = _tools()


@given(arguments=st.dictionaries(_KEYS, _VALUES, max_size=5))
@settings(max_examples=300, deadline=None)
def test_the_direct_routes_argument_validation_is_the_sdks(arguments: dict[str, Any]) -> None:
    """Same arguments (JSON-in-a-string ones too), same validated kwargs or the same errors."""
    for tool in _TOOLS:
        assert _outcome(_Arguments(tool), arguments) == _outcome(
            tool.fn_metadata.validate_arguments, arguments
        )


def _fetch_tool() -> Tool:
    return next(tool for tool in _tools() if tool.name == "anp_fetchDoc")


class _Number(ArgModelBase):
    number: int


def test_argument_validation_follows_a_replaced_model_or_metadata() -> None:
    """The SDK reads the tool's metadata and its argument model live; so does the route."""
    tool = _fetch_tool()
    validate = _Arguments(tool)
    assert validate({"url": "https://a.example/"}) == {"url": "https://a.example/"}
    tool.fn_metadata.arg_model = _Number
    assert validate({"number": "7"}) == {"number": 7}
    tool.fn_metadata = FuncMetadata(arg_model=_tools()[0].fn_metadata.arg_model)
    for arguments in ({"number": "[3]"}, {"url": "https://a.example/"}, {}):
        assert _outcome(validate, arguments) == _outcome(
            tool.fn_metadata.validate_arguments, arguments
        )


class _StrippingMetadata(FuncMetadata):
    def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            key: value.strip() if isinstance(value, str) else value for key, value in data.items()
        }


class _Wider(ArgModelBase):
    number: int


class _WiderStill(_Wider):
    extra: int = 5


class _Widening(_Wider):
    @model_validator(mode="wrap")
    @classmethod
    def widen(cls, data: Any, handler: Any) -> Any:
        return _WiderStill(number=handler(data).number)


def test_a_step_changed_anywhere_is_taken_as_the_sdk_takes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An override of a step, a patch of the SDK's method, a validator that makes another
    model: the route answers as the SDK's own method does."""
    tool = _fetch_tool()
    tool.fn_metadata = _StrippingMetadata(arg_model=tool.fn_metadata.arg_model)
    assert _Arguments(tool)({"url": "  https://a.example/  "}) == {"url": "https://a.example/"}

    tool = _fetch_tool()
    tool.fn_metadata = FuncMetadata(arg_model=_Widening)
    assert _Arguments(tool)({"number": 1}) == {"number": 1, "extra": 5}

    tool = _fetch_tool()
    seen: list[dict[str, Any]] = []
    original = FuncMetadata.validate_arguments

    def audited(self: FuncMetadata, arguments: dict[str, Any]) -> dict[str, Any]:
        seen.append(arguments)
        return original(self, arguments)

    monkeypatch.setattr(FuncMetadata, "validate_arguments", audited)
    _Arguments(tool)({"url": "https://a.example/"})
    assert seen == [{"url": "https://a.example/"}]


_VERSIONS = sorted(version for method, version in SERVER_RESULTS if method == "tools/call")


def _sieved(result: dict[str, Any], version: str) -> Any:
    """What the kernel's result sieve makes of ``result`` (or the error it raises)."""
    try:
        return serialize_server_result("tools/call", version, result)
    except ValidationError as exc:
        return ("rejected", [error["type"] for error in exc.errors()])


@pytest.mark.parametrize("version", _VERSIONS)
def test_every_version_has_its_text_block_found(version: str) -> None:
    model = _text_block_model(version)
    assert model is not None
    typed = _typed_text({"content": [{"type": "text", "text": "{}"}], "isError": False}, version)
    assert type(typed["content"][0]) is model


@settings(max_examples=60, deadline=None)
@given(
    version=st.sampled_from(_VERSIONS),
    texts=st.lists(st.text(), max_size=3),
    structured=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)),
    error=st.booleans(),
)
def test_typed_text_blocks_change_nothing_the_sieve_makes(
    version: str, texts: list[str], structured: dict[str, Any], error: bool
) -> None:
    """The sieve makes the same wire result of a typed block as of the plain dict."""
    result = {
        "content": [{"type": "text", "text": text} for text in texts],
        "structuredContent": structured,
        "isError": error,
        "resultType": "complete",
    }
    assert _sieved(_typed_text(result, version), version) == _sieved(result, version)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text", "text": 5}],  # rejected by the sieve, as it was
        [{"type": "text", "text": "a", "annotations": {"priority": 0.5}}],
        [{"type": "image", "data": "AA==", "mimeType": "image/png"}],
        [{"type": "text", "text": "a"}, "not a block"],
        "not a list",
    ],
)
def test_anything_but_plain_text_blocks_is_left_to_the_sieve(content: Any) -> None:
    result = {"content": content, "isError": False}
    for version in _VERSIONS:
        assert _typed_text(result, version) is result
    assert _typed_text({"content": [{"type": "text", "text": "a"}]}, "1999-01-01") == {
        "content": [{"type": "text", "text": "a"}]
    }


@pytest.fixture
def sieved_blocks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of each content block the result sieve receives (model or dict): the server's
    kernel first, then the client in this process (its own check of the answer, always dicts)."""
    kinds: list[str] = []
    original = sdk_methods.serialize_server_result

    def recording(method: str, version: str, data: Any, **kwargs: Any) -> dict[str, Any]:
        if method == "tools/call":
            kinds.extend(type(block).__name__ for block in data.get("content", []))
        return original(method, version, data, **kwargs)

    monkeypatch.setattr(sdk_methods, "serialize_server_result", recording)
    return kinds


async def test_text_blocks_reach_the_sieve_typed_on_the_stock_server(
    tmp_path: Path, sieved_blocks: list[str]
) -> None:
    async with anp_stack(tmp_path) as stack, stack.client(ALICE) as client:
        assert ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))["status"] == 200
    assert sieved_blocks == ["TextContent", "dict"]


async def test_a_middleware_that_rewrites_the_version_gets_plain_blocks(
    tmp_path: Path, sieved_blocks: list[str]
) -> None:
    """A host's server middleware may hand on a context of another protocol version than the
    one the kernel sieves with: the blocks go as plain data, and the whole result arrives."""

    async def other_version(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> Any:
        return await call_next(dataclasses.replace(ctx, protocol_version="2026-07-28"))

    server = MCPServer("rewriting", middleware=[other_version])
    async with anp_stack(tmp_path, server=server) as stack, stack.client(ALICE) as client:
        answer = await client.call_tool("anp_fetchDoc", {"url": stack.ad_url})
    assert ok(answer)["status"] == 200
    assert isinstance(answer.content[0], TextContent)
    assert json.loads(answer.content[0].text)["status"] == 200
    assert sieved_blocks == ["dict", "dict"]


async def test_a_wrapped_route_gets_plain_data(tmp_path: Path, sieved_blocks: list[str]) -> None:
    """A host wrapping the ``tools/call`` handler after the toolkit installed its route reads
    the result as plain JSON data, as before."""
    server = MCPServer("wrapped")
    seen: list[str] = []
    async with anp_stack(tmp_path, server=server) as stack:
        lowlevel = server._lowlevel_server
        entry = lowlevel.get_request_handler("tools/call")
        assert entry is not None
        inner = entry.handler

        async def audited(ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
            result = await inner(ctx, params)
            seen.append(json.dumps(result))  # plain data: serializable as it is
            return result

        lowlevel.add_request_handler("tools/call", CallToolRequestParams, audited)
        async with stack.client(ALICE) as client:
            assert (
                ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))["status"] == 200
            )
    assert len(seen) == 1 and json.loads(seen[0])["content"][0]["type"] == "text"
    assert sieved_blocks == ["dict", "dict"]
