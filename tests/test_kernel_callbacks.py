"""A session's kernel gets its cached callbacks worked out when it is made, by the SDK's own
properties: the same callbacks as on first use, and nothing else is touched."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp.server.connection import Connection
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import ServerRunner

from mcp2anp_middleware.mcp_hosting.live_session import _fill_cached_callbacks


def kernel(kind: type[ServerRunner[Any]] = ServerRunner) -> ServerRunner[Any]:
    async def make() -> ServerRunner[Any]:  # a connection belongs to a running loop
        connection = Connection.for_loop(object(), session_id="s")  # type: ignore[arg-type]
        return kind(MCPServer("k")._lowlevel_server, connection, None)

    return anyio.run(make)


def test_the_callbacks_are_those_the_properties_make() -> None:
    filled, untouched = kernel(), kernel()
    _fill_cached_callbacks(filled)
    assert set(filled.__dict__) >= {"on_request", "on_notify"}
    assert filled.on_request == filled._on_request
    assert filled.on_notify == filled._on_notify
    assert untouched.on_request == untouched._on_request  # what the property gives on first use


def test_a_subclass_or_a_patched_callback_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Wrapped(ServerRunner[Any]):
        @property
        def on_request(self) -> Any:
            calls.append("on_request")
            return self._on_request

    runner = kernel(Wrapped)
    _fill_cached_callbacks(runner)
    assert "on_request" not in runner.__dict__ and "on_notify" not in runner.__dict__
    assert calls == []

    def patched(self: ServerRunner[Any]) -> Any:
        calls.append("patched")
        return self._on_request

    monkeypatch.setattr(ServerRunner, "on_request", patched)  # a plain function now
    runner = kernel()
    _fill_cached_callbacks(runner)
    assert "on_request" not in runner.__dict__  # the patch is what attribute access finds
    assert runner.__dict__["on_notify"] == runner._on_notify  # still a cached property: filled
