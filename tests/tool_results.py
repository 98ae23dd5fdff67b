"""Reading an ANP tool's answer in tests: its structured result, or its structured error."""

from __future__ import annotations

from typing import Any

from mcp.types import CallToolResult


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


def err(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result.content
    assert result.structured_content is not None
    error: dict[str, Any] = result.structured_content["error"]
    assert error["message"] and error["hint"]
    return error
