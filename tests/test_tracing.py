"""The SDK's OpenTelemetry spans: skipped while nothing records them, made as before once a
tracer provider is installed (a real one: the OpenTelemetry SDK with an in-memory exporter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp
import mcp.shared._otel as sdk_otel
import opentelemetry.trace as otel_trace
import pytest
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.mcpserver import MCPServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette

from mcp2anp_middleware import ANPMiddleware
from mcp2anp_middleware.mcp_hosting.tracing import SpansWhenTraced, spans_when_traced

from .servers import serve

pytestmark = pytest.mark.anyio


def echo_server() -> MCPServer:
    server = MCPServer("traced")

    @server.tool()
    async def echo(text: str) -> str:
        return text

    return server


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A real tracer provider, installed as the global one for this test only (the API allows
    setting it once per process, so the global and the SDK's cached tracer are patched)."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(sdk_otel, "_tracer", provider.get_tracer("mcp-python-sdk"))
    yield exported
    provider.shutdown()


async def call_echo(tmp_path: Path, server: MCPServer) -> None:
    app = ANPMiddleware(Starlette(), server=server, data_dir=tmp_path)
    async with serve(app) as base, mcp.Client(f"{base}/mcp", mode="legacy") as client:
        called = await client.call_tool("echo", {"text": "hi"})
        assert called.content[0].text == "hi"  # type: ignore[union-attr]


def test_the_sdk_span_middleware_is_swapped_and_others_are_left_alone(tmp_path: Path) -> None:
    class Custom(OpenTelemetryMiddleware):
        pass

    custom = Custom()
    other: Any = object()
    middleware: list[Any] = [OpenTelemetryMiddleware(), custom, other]
    spans_when_traced(middleware)
    assert type(middleware[0]) is SpansWhenTraced
    assert middleware[1:] == [custom, other]
    server = echo_server()
    ANPMiddleware(Starlette(), server=server, data_dir=tmp_path)
    assert type(server._lowlevel_server.middleware[0]) is SpansWhenTraced


async def test_no_span_is_built_while_no_provider_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []
    original = OpenTelemetryMiddleware.__call__

    async def counting(self: Any, ctx: Any, call_next: Any) -> Any:
        built.append(ctx.method)
        return await original(self, ctx, call_next)

    monkeypatch.setattr(OpenTelemetryMiddleware, "__call__", counting)
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)
    await call_echo(tmp_path, echo_server())
    assert built == []


async def test_spans_are_made_as_before_once_a_provider_is_installed(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    await call_echo(tmp_path, echo_server())
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert "tools/call echo" in spans
    attributes = spans["tools/call echo"].attributes or {}
    assert attributes["gen_ai.tool.name"] == "echo"
    assert attributes["mcp.method.name"] == "tools/call"


async def test_every_initialize_gets_its_span_once_a_provider_is_installed(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    """(Untraced, a repeated ``initialize`` is answered from the kernel's first answer; traced,
    the kernel answers each one inside its span.)"""
    server = echo_server()
    await call_echo(tmp_path, server)
    await call_echo(tmp_path / "again", server)
    names = [span.name for span in exporter.get_finished_spans()]
    assert names.count("initialize") == 2
