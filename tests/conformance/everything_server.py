"""The "everything server" the official MCP conformance suite expects, hosted by ANPMiddleware.

Every tool, resource, prompt and handler below is named and shaped as the server scenarios of
``@modelcontextprotocol/conformance`` (0.1.16) call and check them. The MCP server is hosted
exactly as an embedding app would: ``ANPMiddleware(<host app>, server=...)`` with the
middleware's defaults (no ``json_response`` argument), so the suite tests those defaults.

Run by ``tests/test_conformance.py`` as::

    python -m uvicorn --factory tests.conformance.everything_server:create_app \
        --host 127.0.0.1 --port N

Environment:

- ``EVERYTHING_DATA_DIR``: the middleware's data directory (default: a new temporary one);
- ``EVERYTHING_REDIS_URL``: a Redis URL for a shared session store (unset: memory store);
- ``EVERYTHING_PUBLIC_URL``: the origin clients reach the server at (unset: none);
- ``EVERYTHING_WORKER_NAME``: sent back as ``X-Conformance-Worker`` on every response, so a test
  can see which worker behind a load balancer answered.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import tempfile
import wave
import zlib
from typing import Any

import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Message, UserMessage
from mcp.server.mcpserver.tools import Tool
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from mcp2anp_middleware import ANPMiddleware

WORKER_HEADER = "x-conformance-worker"


def _png_1x1_red() -> bytes:
    """A valid 1x1 RGB PNG holding one red pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _wav_silence() -> bytes:
    """A valid mono 16-bit WAV file of 80 silent samples (10 ms at 8 kHz)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 80)
    return buffer.getvalue()


PNG_BYTES = _png_1x1_red()
PNG_B64 = base64.b64encode(PNG_BYTES).decode("ascii")
WAV_B64 = base64.b64encode(_wav_silence()).decode("ascii")

JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _result(*content: types.ContentBlock, is_error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=list(content), is_error=is_error)


def _session(ctx: Context) -> Any:
    """The SDK session of a tool call (server-to-client requests and notifications)."""
    return ctx.request_context.session


# -- tools ---------------------------------------------------------------------------------------


def register_tools(server: MCPServer) -> None:
    @server.tool(description="Returns a simple text response")
    def test_simple_text() -> types.CallToolResult:
        return _result(_text("This is a simple text response for testing."))

    @server.tool(description="Returns a 1x1 red PNG image")
    def test_image_content() -> types.CallToolResult:
        return _result(types.ImageContent(type="image", data=PNG_B64, mime_type="image/png"))

    @server.tool(description="Returns a short silent WAV clip")
    def test_audio_content() -> types.CallToolResult:
        return _result(types.AudioContent(type="audio", data=WAV_B64, mime_type="audio/wav"))

    @server.tool(description="Returns an embedded text resource")
    def test_embedded_resource() -> types.CallToolResult:
        return _result(
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="test://embedded-resource",
                    mime_type="text/plain",
                    text="This is an embedded resource content.",
                ),
            )
        )

    @server.tool(description="Returns text, image and resource content together")
    def test_multiple_content_types() -> types.CallToolResult:
        return _result(
            _text("Multiple content types test:"),
            types.ImageContent(type="image", data=PNG_B64, mime_type="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(
                    uri="test://mixed-content-resource",
                    mime_type="application/json",
                    text=json.dumps({"test": "data", "value": 123}),
                ),
            ),
        )

    @server.tool(description="Sends three info log notifications while it runs")
    async def test_tool_with_logging(ctx: Context) -> types.CallToolResult:
        await ctx.log("info", "Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.log("info", "Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.log("info", "Tool execution completed")
        return _result(_text("Tool with logging executed successfully"))

    @server.tool(description="Always fails with a tool error")
    def test_error_handling() -> types.CallToolResult:
        return _result(_text("This tool intentionally returns an error for testing"), is_error=True)

    @server.tool(description="Reports progress 0, 50 and 100 of 100")
    async def test_tool_with_progress(ctx: Context) -> types.CallToolResult:
        await ctx.report_progress(0, 100)
        await asyncio.sleep(0.05)
        await ctx.report_progress(50, 100)
        await asyncio.sleep(0.05)
        await ctx.report_progress(100, 100)
        return _result(_text("Tool with progress executed successfully"))

    @server.tool(description="Asks the client's LLM to answer a prompt (sampling)")
    async def test_sampling(prompt: str, ctx: Context) -> types.CallToolResult:
        result = await _session(ctx).create_message(
            messages=[types.SamplingMessage(role="user", content=_text(prompt))],
            max_tokens=100,
            related_request_id=ctx.request_context.request_id,
        )
        content = result.content
        answer = content.text if isinstance(content, types.TextContent) else str(content)
        return _result(_text(f"LLM response: {answer}"))

    @server.tool(description="Asks the user for a username and an email (elicitation)")
    async def test_elicitation(message: str, ctx: Context) -> types.CallToolResult:
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        result = await _elicit(ctx, message, schema)
        return _result(_text(f"User response: action={result.action}, content={result.content}"))

    @server.tool(description="Elicitation whose schema has defaults for every primitive type")
    async def test_elicitation_sep1034_defaults(ctx: Context) -> types.CallToolResult:
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active",
                },
                "verified": {"type": "boolean", "description": "Verified user", "default": True},
            },
            "required": [],
        }
        result = await _elicit(ctx, "Please review and update the form fields", schema)
        return _result(
            _text(f"Elicitation completed: action={result.action}, content={result.content}")
        )

    @server.tool(description="Elicitation using all five enum schema variants")
    async def test_elicitation_sep1330_enums(ctx: Context) -> types.CallToolResult:
        schema = {
            "type": "object",
            "properties": {
                "untitledSingle": {
                    "type": "string",
                    "description": "Untitled single-select",
                    "enum": ["option1", "option2", "option3"],
                },
                "titledSingle": {
                    "type": "string",
                    "description": "Titled single-select",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "description": "Legacy titled enum",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {
                    "type": "array",
                    "description": "Untitled multi-select",
                    "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                },
                "titledMulti": {
                    "type": "array",
                    "description": "Titled multi-select",
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
            "required": [],
        }
        result = await _elicit(ctx, "Please select options", schema)
        return _result(
            _text(f"Elicitation completed: action={result.action}, content={result.content}")
        )

    @server.tool(
        description="Closes its SSE response stream mid-call, then answers (SEP-1699 polling)"
    )
    async def test_reconnection(ctx: Context) -> types.CallToolResult:
        await asyncio.sleep(0.05)
        await ctx.close_sse_stream()  # a no-op without an event store
        await asyncio.sleep(0.1)
        return _result(_text("Reconnection test completed"))


def json_schema_2020_12_tool() -> Tool:
    """The tool of scenario json-schema-2020-12, advertising the suite's schema verbatim:
    ``$schema``, ``$defs`` and ``additionalProperties`` must survive the listing (SEP-1613).
    Arguments are still validated by the function's own model."""

    def json_schema_2020_12_tool(
        name: str | None = None, address: dict[str, Any] | None = None
    ) -> types.CallToolResult:
        return _result(_text(f"JSON Schema 2020-12 tool called: name={name}, address={address}"))

    tool = Tool.from_function(
        json_schema_2020_12_tool, description="Tool with JSON Schema 2020-12 features"
    )
    tool.parameters = {
        "$schema": JSON_SCHEMA_2020_12,
        "type": "object",
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            }
        },
        "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
        "additionalProperties": False,
    }
    return tool


async def _elicit(ctx: Context, message: str, schema: dict[str, Any]) -> types.ElicitResult:
    result: types.ElicitResult = await _session(ctx).elicit_form(
        message, schema, related_request_id=ctx.request_context.request_id
    )
    return result


# -- resources -----------------------------------------------------------------------------------


def register_resources(server: MCPServer) -> None:
    @server.resource(
        "test://static-text", name="static-text", description="A static text resource",
        mime_type="text/plain",
    )  # fmt: skip
    def static_text() -> str:
        return "This is the content of the static text resource."

    @server.resource(
        "test://static-binary", name="static-binary", description="A static binary resource",
        mime_type="image/png",
    )  # fmt: skip
    def static_binary() -> bytes:
        return PNG_BYTES

    @server.resource(
        "test://watched-resource", name="watched-resource",
        description="A resource clients may subscribe to", mime_type="text/plain",
    )  # fmt: skip
    def watched_resource() -> str:
        return "Watched resource content"

    @server.resource(
        "test://template/{id}/data", name="template-data",
        description="A resource template with an id parameter", mime_type="application/json",
    )  # fmt: skip
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


# -- prompts -------------------------------------------------------------------------------------


def register_prompts(server: MCPServer) -> None:
    @server.prompt(description="A simple prompt without arguments")
    def test_simple_prompt() -> list[Message]:
        return [UserMessage("This is a simple prompt for testing.")]

    @server.prompt(description="A prompt with two required arguments")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[Message]:
        return [UserMessage(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'")]

    @server.prompt(description="A prompt that embeds a resource")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[Message]:
        return [
            UserMessage(
                types.EmbeddedResource(
                    type="resource",
                    resource=types.TextResourceContents(
                        uri=resourceUri,
                        mime_type="text/plain",
                        text="Embedded resource content for testing.",
                    ),
                )
            ),
            UserMessage("Please process the embedded resource above."),
        ]

    @server.prompt(description="A prompt that carries an image")
    def test_prompt_with_image() -> list[Message]:
        return [
            UserMessage(types.ImageContent(type="image", data=PNG_B64, mime_type="image/png")),
            UserMessage("Please analyze the image above."),
        ]


# -- handlers the MCPServer API has no decorator for ---------------------------------------------

_COMPLETIONS = {"arg1": ["paris", "park", "party", "test", "testing"], "arg2": ["alpha", "beta"]}


def register_handlers(server: MCPServer) -> None:
    lowlevel = server._lowlevel_server

    async def set_level(
        ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        return types.EmptyResult()

    async def subscribe(
        ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        return types.EmptyResult()

    async def complete(
        ctx: ServerRequestContext[Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        values: list[str] = []
        if isinstance(params.ref, types.PromptReference) and (
            params.ref.name == "test_prompt_with_arguments"
        ):
            candidates = _COMPLETIONS.get(params.argument.name, [])
            values = [v for v in candidates if v.startswith(params.argument.value)]
        return types.CompleteResult(
            completion=types.Completion(values=values, total=len(values), has_more=False)
        )

    lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler(
        "resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe
    )
    lowlevel.add_request_handler("completion/complete", types.CompleteRequestParams, complete)


def register_deployment_checks(server: MCPServer) -> None:
    """Tools of the repository's own cross-worker tests (the suite ignores extra tools)."""

    @server.tool(description="The worker serving this call, and what the handshake told it")
    async def whoami(ctx: Context) -> str:
        params = ctx.session.client_params
        capabilities = ctx.client_capabilities
        return json.dumps(
            {
                "worker": os.environ.get("EVERYTHING_WORKER_NAME"),
                "client": params.client_info.name if params is not None else None,
                "sampling": capabilities is not None and capabilities.sampling is not None,
            }
        )

    @server.tool(description="Reports progress twice, a moment apart, then answers")
    async def steps(ctx: Context) -> str:
        await ctx.report_progress(1, 2, "first")
        await asyncio.sleep(0.3)  # long enough for a client to drop its stream in between
        await ctx.report_progress(2, 2, "second")
        return "steps done"

    @server.tool(description="Asks for a color over multi-round-trip requests (2026-07-28)")
    async def pick_color(ctx: Context) -> types.InputRequiredResult | str:
        responses = ctx.input_responses
        if not responses:
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(
                    message="Pick a color",
                    requested_schema={
                        "type": "object",
                        "properties": {"color": {"type": "string"}},
                        "required": ["color"],
                    },
                )
            )
            worker = os.environ.get("EVERYTHING_WORKER_NAME") or "solo"
            return types.InputRequiredResult(
                input_requests={"color": ask}, request_state=f"asked by {worker}"
            )
        answer = responses.get("color")
        content = answer.content if isinstance(answer, types.ElicitResult) else None
        color = (content or {}).get("color")
        worker = os.environ.get("EVERYTHING_WORKER_NAME") or "solo"
        return f"{color}; {ctx.request_state}; answered by {worker}"


def build_server() -> MCPServer:
    server = MCPServer(
        "mcp-conformance-everything-server", version="1.0.0", tools=[json_schema_2020_12_tool()]
    )
    register_tools(server)
    register_deployment_checks(server)
    register_resources(server)
    register_prompts(server)
    register_handlers(server)
    return server


# -- hosting -------------------------------------------------------------------------------------


class WorkerHeader:
    """Adds ``X-Conformance-Worker: <name>`` to every HTTP response of ``app``."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(WORKER_HEADER, self.name)
            await send(message)

        await self.app(scope, receive, sending)


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("conformance everything-server host app\n")


def create_app() -> ASGIApp:
    """The ASGI app uvicorn serves (``--factory``): a host app with the MCP server under /mcp."""
    data_dir = os.environ.get("EVERYTHING_DATA_DIR") or tempfile.mkdtemp(prefix="everything-")
    redis_url = os.environ.get("EVERYTHING_REDIS_URL")
    options: dict[str, Any] = {}
    if redis_url:
        from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

        options["store"] = RedisSessionStore.from_url(redis_url, prefix="conformance:")
    public_url = os.environ.get("EVERYTHING_PUBLIC_URL") or None
    host = Starlette(routes=[Route("/", _home)])
    app: ASGIApp = ANPMiddleware(
        host, server=build_server(), data_dir=data_dir, public_url=public_url, **options
    )
    worker = os.environ.get("EVERYTHING_WORKER_NAME")
    return WorkerHeader(app, worker) if worker else app
