"""Whose request-state policy a hosted server keeps (2026-07-28 ``requestState``)."""

from __future__ import annotations

import httpx
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp_types import PROTOCOL_VERSION_META_KEY

from mcp2anp_middleware import MCPSessionMiddleware, SessionConfig, StaticKeyAuthenticator
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.mcp_hosting.request_state import (
    RingCodec,
    SharedRequestState,
    middleware_principal,
)

from .inner_apps import HostApp
from .messages import INITIALIZE, MCP_HEADERS

pytestmark = pytest.mark.anyio

MODERN_META = {
    PROTOCOL_VERSION_META_KEY: "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


class KmsCodec:
    """A host's own codec (a KMS, say): not the SDK's AES-GCM one."""

    def seal(self, payload: bytes) -> str:
        return payload.hex()

    def unseal(self, token: str) -> bytes:
        return bytes.fromhex(token)


def policy(server: MCPServer) -> RequestStateSecurity:
    (boundary,) = [
        m for m in server._lowlevel_server.middleware if isinstance(m, RequestStateBoundary)
    ]
    return boundary._security


def test_the_default_policy_seals_with_the_shared_ring_bound_to_the_middlewares_principal() -> None:
    server = MCPServer("ring", request_state_security=RequestStateSecurity.ephemeral(ttl=30))
    shared = SharedRequestState(server)
    installed = policy(server)
    assert installed.codec is shared.codec and isinstance(installed.codec, RingCodec)
    assert installed.bind_principal is middleware_principal and installed.ttl == 30
    assert not shared.fixed  # its keys come from the store


def test_a_codec_of_the_hosts_own_is_kept_and_bound_to_the_middlewares_principal() -> None:
    codec = KmsCodec()
    own = RequestStateSecurity(codec=codec, ttl=45, audience="svc")
    server = MCPServer("kms", request_state_security=own)
    shared = SharedRequestState(server)
    installed = policy(server)
    assert installed.codec is codec and shared.fixed  # nothing to load from the store
    assert installed.bind_principal is middleware_principal
    assert (installed.ttl, installed.audience) == (45, "svc")


def test_fixed_keys_replace_even_a_hosts_own_codec() -> None:
    server = MCPServer("kms", request_state_security=RequestStateSecurity(codec=KmsCodec()))
    shared = SharedRequestState(server, keys=[b"k" * 32])
    assert policy(server).codec is shared.codec and shared.fixed


async def test_an_endpoint_not_running_refuses_both_eras_and_seals_nothing() -> None:
    """Without its service started, the endpoint seals no state under a key of its own (that
    no other worker could open): a session-less request is refused as a handshake is."""
    server = MCPServer("idle")

    @server.tool()
    async def ask() -> str:
        """Answer."""
        return "answer"

    middleware = MCPSessionMiddleware(
        HostApp(),
        mcp_app=MCPEndpoint(server),  # (its service is not among the middleware's services)
        authenticator=StaticKeyAuthenticator({"k" * 20: SessionConfig(principal="alice")}),
    )
    headers = {**MCP_HEADERS, "x-api-key": "k" * 20}
    modern = {
        **headers,
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "ask",
    }
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "ask", "arguments": {}, "_meta": MODERN_META},
    }
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for sent, payload in ((headers, INITIALIZE), (modern, call)):
            answer = await client.post("/mcp", json=payload, headers=sent)
            assert answer.status_code == 503
            assert answer.json()["error"]["message"] == "MCP endpoint is not running"
    assert len(middleware.registry.store) == 0  # type: ignore[arg-type]
    await middleware.shutdown()


def test_a_second_endpoint_over_the_same_server_shares_the_ring_too() -> None:
    """The first endpoint's ring is not a codec of the host's own: a second endpoint over the
    same server (two middlewares in one process) installs its own ring and loads its keys."""
    server = MCPServer("twice")
    SharedRequestState(server)
    second = SharedRequestState(server)
    assert policy(server).codec is second.codec and not second.fixed
