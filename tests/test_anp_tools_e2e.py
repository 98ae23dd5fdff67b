"""ANP tools end to end: real uvicorn, the official MCP client, real DID WBA signatures."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
import structlog
from mcp import MCPError

from mcp2anp_middleware import SessionConfig
from mcp2anp_middleware.anp_tools.toolkit import ATTACHMENT, ANPToolHandler
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy

from .anp_stack import API_KEYS, anp_stack
from .messages import INITIALIZE as INIT
from .messages import MCP_HEADERS
from .tool_results import err, ok

pytestmark = pytest.mark.anyio

ALICE, BOB = list(API_KEYS)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_browse_then_invoke_in_both_eras(tmp_path: Path, mode: str) -> None:
    async with anp_stack(tmp_path) as stack, stack.client(ALICE, mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) >= {"anp_fetchDoc", "anp_invokeOpenRPC"}
        assert tools["anp_fetchDoc"].description and tools["anp_invokeOpenRPC"].input_schema

        ad = ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))
        assert ad["status"] == 200 and ad["content_type"].startswith("application/json")
        assert ad["document"]["@type"] == "ad:AgentDescription"
        interface = next(link for link in ad["links"] if link["kind"] == "interface")

        openrpc = ok(await client.call_tool("anp_fetchDoc", {"url": interface["url"]}))
        methods = {method["name"]: method for method in openrpc["methods"]}
        assert {"whoami", "echo", "add"} <= set(methods)
        endpoint = methods["whoami"]["endpoint"]
        assert endpoint == f"{stack.base_url}/agent/rpc"

        who = ok(
            await client.call_tool(
                "anp_invokeOpenRPC", {"endpoint": endpoint, "method": "whoami", "request_id": 7}
            )
        )
        assert who["result"]["did"] == stack.identities["alice"].did
        assert who["request_id"] == 7
        added = ok(
            await client.call_tool(
                "anp_invokeOpenRPC", {"endpoint": endpoint, "method": "add", "params": [2, 3]}
            )
        )
        assert added["result"] == 5
        if mode == "legacy":
            assert len(stack.middleware.registry) == 1


async def test_two_sessions_sign_as_two_callers(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack:
        endpoint = f"{stack.base_url}/agent/rpc"
        async with stack.client(ALICE) as alice, stack.client(BOB) as bob:
            args = {"endpoint": endpoint, "method": "whoami"}
            seen_alice, seen_bob = await asyncio.gather(
                alice.call_tool("anp_invokeOpenRPC", args), bob.call_tool("anp_invokeOpenRPC", args)
            )
        assert ok(seen_alice)["result"]["did"] == stack.identities["alice"].did
        assert ok(seen_bob)["result"]["did"] == stack.identities["bob"].did


async def test_wrong_api_key_gets_401_and_no_session(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack:
        async with httpx.AsyncClient() as http:
            for headers in ({"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {}):
                response = await http.post(
                    stack.mcp_url, json=INIT, headers={**MCP_HEADERS, **headers}
                )
                assert response.status_code == 401
                assert response.json()["error"]["code"] == -32001
                assert "mcp-session-id" not in response.headers
        with pytest.raises(BaseException) as caught:
            async with stack.client("wrong"):
                pass  # pragma: no cover
        assert (
            caught.group_contains(MCPError)
            if isinstance(caught.value, BaseExceptionGroup)
            else True
        )
        assert len(stack.middleware.registry) == 0


async def test_other_principal_cannot_use_a_session(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack, httpx.AsyncClient() as http:
        created = await http.post(
            stack.mcp_url, json=INIT, headers={**MCP_HEADERS, "X-API-Key": ALICE}
        )
        session_id = created.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        stolen = await http.post(
            stack.mcp_url,
            json=listing,
            headers={
                **MCP_HEADERS,
                "X-API-Key": BOB,
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": "2025-11-25",
            },
        )
        assert stolen.status_code == 404
        assert stolen.json()["error"]["message"] == "Session not found"
        own = await http.post(
            stack.mcp_url,
            json=listing,
            headers={
                **MCP_HEADERS,
                "X-API-Key": ALICE,
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": "2025-11-25",
            },
        )
        assert own.status_code == 200


async def test_unsigned_call_to_agent_is_refused(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack, httpx.AsyncClient() as http:
        response = await http.post(
            f"{stack.base_url}/agent/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "whoami"}
        )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == -32001


async def test_failures_are_tool_errors_with_codes(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack, stack.client(ALICE) as client:
        endpoint = f"{stack.base_url}/agent/rpc"
        unknown = err(
            await client.call_tool("anp_invokeOpenRPC", {"endpoint": endpoint, "method": "nope"})
        )
        assert unknown["code"] == "JSONRPC_ERROR" and unknown["jsonrpc_code"] == -32601
        failed = err(
            await client.call_tool(
                "anp_invokeOpenRPC",
                {
                    "endpoint": endpoint,
                    "method": "fail",
                    "params": {"code": -32050, "message": "x"},
                },
            )
        )
        assert failed["jsonrpc_code"] == -32050 and failed["status"] == 400
        assert failed["data"] is not None
        missing = err(
            await client.call_tool("anp_fetchDoc", {"url": f"{stack.base_url}/agent/missing"})
        )
        assert missing["code"] == "HTTP_ERROR" and missing["status"] == 404
        refused = err(await client.call_tool("anp_fetchDoc", {"url": "file:///etc/passwd"}))
        assert refused["code"] == "URL_REFUSED"
        from .servers import free_port

        dead = err(
            await client.call_tool("anp_fetchDoc", {"url": f"http://127.0.0.1:{free_port()}/x"})
        )
        assert dead["code"] == "UNREACHABLE"
        not_rpc = err(
            await client.call_tool(
                "anp_invokeOpenRPC", {"endpoint": f"{stack.base_url}/", "method": "x"}
            )
        )
        assert not_rpc["code"] in ("HTTP_ERROR", "INVALID_RESPONSE")


async def test_private_ranges_refused_unless_configured(tmp_path: Path) -> None:
    async with anp_stack(tmp_path, url_policy=URLPolicy()) as stack, stack.client(ALICE) as client:
        refused = err(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))
    assert refused["code"] == "URL_REFUSED" and "private" in refused["message"]


async def test_bad_did_credential_is_refused_at_session_creation(tmp_path: Path) -> None:
    mismatched: dict[str, SessionConfig] = {}
    async with anp_stack(tmp_path, extra_configs=mismatched) as stack:
        alice, bob = stack.identities["alice"], stack.identities["bob"]
        stack.configs["key-broken"] = SessionConfig(
            principal="broken",
            did_document_path=alice.did_document_path,
            private_key_path=bob.private_key_path,
        )
        stack.configs["key-missing"] = SessionConfig(
            principal="missing",
            did_document_path=tmp_path / "nope.json",
            private_key_path=tmp_path / "nope.pem",
        )
        async with httpx.AsyncClient() as http:
            for key in ("key-broken", "key-missing"):
                response = await http.post(
                    stack.mcp_url, json=INIT, headers={**MCP_HEADERS, "X-API-Key": key}
                )
                assert response.status_code == 401
                assert (
                    "DID" in response.json()["error"]["message"]
                    or "key" in response.json()["error"]["message"]
                )
        assert len(stack.middleware.registry) == 0


async def test_crawler_created_lazily_and_once(tmp_path: Path) -> None:
    async with anp_stack(tmp_path) as stack, stack.client(ALICE) as client:
        (state,) = stack.sessions()
        assert state.attachment(ATTACHMENT) is None
        results = await asyncio.gather(
            *[client.call_tool("anp_fetchDoc", {"url": stack.ad_url}) for _ in range(8)]
        )
        assert all(not r.is_error for r in results)
        handler = state.attachment(ATTACHMENT)
        assert isinstance(handler, ANPToolHandler)
        await client.call_tool("anp_fetchDoc", {"url": stack.ad_url})
        assert state.attachment(ATTACHMENT) is handler
    # released with the session (DELETE), through the session events
    assert state.closed and state.attachment(ATTACHMENT) is None


QUERY_SECRET = "q7-query-secret-e41"


async def test_secrets_never_reach_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        async with anp_stack(tmp_path) as stack, stack.client(ALICE) as client:
            ok(await client.call_tool("anp_fetchDoc", {"url": stack.ad_url}))
            ok(
                await client.call_tool(
                    "anp_invokeOpenRPC",
                    {"endpoint": f"{stack.base_url}/agent/rpc", "method": "whoami"},
                )
            )
            # A secret in a URL's query: a failed call logs the URL, as host and path only.
            missing = f"{stack.base_url}/agent/missing.json?token={QUERY_SECRET}"
            failed = await client.call_tool("anp_fetchDoc", {"url": missing})
            assert failed.is_error
            sessions = stack.sessions()
            session_ids = [s.session_id for s in sessions]
            handlers = [s.attachment(ATTACHMENT) for s in sessions]
            tokens = [t for h in handlers for t in h.crawler.signer.tokens.values()]
            pem = stack.identities["alice"].private_key_path.read_text()
    assert tokens  # the demo agent issued a bearer token to the session
    # The MCP client runs in this process too and logs what it receives (httpcore2 traces
    # response headers at DEBUG, the client logs the session id it got); only the server side
    # counts. The server's own outgoing client (httpx/httpcore) is included.
    client_side = ("httpcore2", "httpx2", "mcp.client")
    server_records = [r for r in caplog.records if not r.name.startswith(client_side)]
    text = "\n".join(r.getMessage() + repr(r.args) for r in server_records)
    text += "\n".join(repr(e) for e in events)
    assert ALICE not in text
    assert pem.strip().splitlines()[1] not in text
    for secret in [*session_ids, *tokens, QUERY_SECRET]:
        assert secret not in text
    assert "Session created" in text


async def test_host_server_keeps_its_own_tools(tmp_path: Path) -> None:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("host-server")

    @server.tool()
    def host_status() -> str:
        """A tool of the host's own."""
        return "all good"

    async with anp_stack(tmp_path, server=server) as stack, stack.client(ALICE) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"host_status", "anp_fetchDoc", "anp_invokeOpenRPC"} <= names
        assert ok(await client.call_tool("host_status", {})) == {"result": "all good"}


async def test_dev_mode_generates_a_local_did(tmp_path: Path) -> None:
    from mcp2anp_middleware import ensure_dev_identity
    from mcp2anp_middleware.anp_tools.credentials import load_credential

    data_dir = tmp_path / "data"
    first = ensure_dev_identity(data_dir)
    again = ensure_dev_identity(data_dir)
    assert first == again  # created once, then reused
    assert load_credential(first).did.startswith("did:wba:localhost")
    key_mode = first.private_key_path.stat().st_mode & 0o777 if first.private_key_path else 0
    assert key_mode == 0o600
