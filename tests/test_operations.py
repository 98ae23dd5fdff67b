"""Operations: the version a server reports, and tool schemas that strict clients accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

import mcp2anp_middleware
from mcp2anp_middleware.version import __version__

from .anp_stack import API_KEYS, anp_stack
from .messages import INITIALIZE, MCP_HEADERS, answer_of

pytestmark = pytest.mark.anyio

ALICE = next(iter(API_KEYS))


def test_the_package_knows_its_version() -> None:
    assert mcp2anp_middleware.__version__ == __version__
    assert __version__[0].isdigit() and "unknown" not in __version__


async def test_server_info_carries_the_version(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack, httpx.AsyncClient() as http:
        headers = {**MCP_HEADERS, "X-API-Key": ALICE}
        answer = await http.post(stack.mcp_url, json=INITIALIZE, headers=headers)
    server_info = answer_of(answer)["result"]["serverInfo"]
    assert server_info == {"name": "mcp2anp", "version": __version__}


def _subschemas(schema: Any) -> list[dict[str, Any]]:
    """Every schema object nested in ``schema`` (properties, items, anyOf/oneOf/allOf)."""
    found: list[dict[str, Any]] = []
    if isinstance(schema, dict):
        found.append(schema)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                found += _subschemas(schema[key])
        for key in ("anyOf", "oneOf", "allOf"):
            for member in schema.get(key, []):
                found += _subschemas(member)
        for member in schema.get("properties", {}).values():
            found += _subschemas(member)
    return found


async def test_tool_input_schemas_pass_strict_validation(tmp_path: Path) -> None:
    """A strict JSON Schema validator (the MCP Inspector's ``--strict``) refuses a schema object
    with no validation keyword, such as pydantic's ``items: {}``."""
    keywords = {"type", "anyOf", "oneOf", "allOf", "enum", "const", "$ref"}
    async with anp_stack(tmp_path) as stack, stack.client(ALICE) as client:
        tools = (await client.list_tools()).tools
    schemas = {tool.name: tool.input_schema for tool in tools}
    assert {"anp_fetchDoc", "anp_invokeOpenRPC"} <= set(schemas)
    for name in ("anp_fetchDoc", "anp_invokeOpenRPC"):
        for sub in _subschemas(schemas[name]):
            assert keywords & set(sub), f"{name}: schema without a validation keyword: {sub}"
