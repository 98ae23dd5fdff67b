"""JSON-RPC messages and headers the tests send."""

from __future__ import annotations

from typing import Any

PROTOCOL = "2025-11-25"
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}

INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
"""A complete ``initialize``, as the official SDK server expects it."""

BARE_INITIALIZE: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
"""Enough of an ``initialize`` for the recording inner app of the middleware tests."""

PING: dict[str, Any] = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
