"""JSON-RPC messages and headers the tests send."""

from __future__ import annotations

import json
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


def answer_of(response: Any) -> Any:
    """The JSON-RPC answer in an HTTP response: its JSON body, or the response event of an SSE
    stream (MCP's default). None when there is neither."""
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        answer = None
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                message = json.loads(line[5:])
                if "result" in message or "error" in message:
                    answer = message
        return answer
    try:
        return response.json()
    except ValueError:
        return None
