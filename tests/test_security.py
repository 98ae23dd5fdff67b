"""Security promises: id entropy, origin checks, revocation, and the tools' URL policy (SSRF)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from mcp2anp_middleware import (
    AuthenticationError,
    Credentials,
    MCPSessionMiddleware,
    SessionConfig,
    URLPolicy,
)
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.authentication.authenticators import CachingAuthenticator
from mcp2anp_middleware.sessions.clock import ManualClock
from mcp2anp_middleware.sessions.ids import new_session_id
from mcp2anp_middleware.sessions.policy import RequestLimits

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT
from .messages import PING
from .servers import free_port, serve

pytestmark = pytest.mark.anyio


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def test_session_ids_carry_at_least_128_bits() -> None:
    """Estimate entropy from symbol frequencies over many ids (Shannon, per character)."""
    ids = [new_session_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    length = {len(i) for i in ids}
    assert length == {43}
    counts = Counter("".join(ids))
    total = sum(counts.values())
    bits_per_char = -sum(c / total * math.log2(c / total) for c in counts.values())
    assert len(counts) == 64  # the whole URL-safe alphabet is in use
    assert bits_per_char > 5.95  # log2(64) = 6 for a uniform source
    assert bits_per_char * 43 >= 128 * 1.9  # 256 bits minted; far above the 128 required


@pytest.mark.parametrize(
    ("origin", "allowed_origins", "status"),
    [
        ("https://evil.example", None, 403),
        ("http://127.0.0.1:5173", None, 200),
        ("http://localhost:3000", None, 200),
        ("null", None, 403),
        ("https://app.example.com", ["https://app.example.com"], 200),
        ("https://evil.example", ["https://app.example.com"], 403),
        ("http://localhost:3000", ["https://app.example.com"], 403),
        ("https://anything.example", ["*"], 200),
    ],
)
async def test_origin_validation(
    origin: str, allowed_origins: list[str] | None, status: int
) -> None:
    middleware = MCPSessionMiddleware(
        HostApp(), mcp_app=RecordingMCPApp(), limits=RequestLimits(allowed_origins=allowed_origins)
    )
    async with client_for(middleware) as client:
        response = await client.post("/mcp", json=INIT, headers={"Origin": origin})
    assert response.status_code == status
    if status == 403:
        assert response.json()["error"]["message"] == "Forbidden: Origin not allowed"
        assert len(middleware.registry) == 0


async def test_revoked_credential_stops_working_after_the_cache_ttl() -> None:
    clock = ManualClock()
    valid = {"key-1"}

    async def verifier(credentials: Credentials) -> SessionConfig:
        if credentials.api_key in valid:
            return SessionConfig(principal="alice")
        raise AuthenticationError("credential refused")

    middleware = MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        authenticator=CachingAuthenticator(verifier, ttl=60, clock=clock),
        clock=clock,
    )
    headers = {"X-API-Key": "key-1"}
    async with client_for(middleware) as client:
        session_id = (await client.post("/mcp", json=INIT, headers=headers)).headers[
            "mcp-session-id"
        ]
        headers["Mcp-Session-Id"] = session_id
        valid.clear()  # revoked at the verifier
        clock.advance(30)
        assert (await client.post("/mcp", json=PING, headers=headers)).status_code == 200
        clock.advance(31)  # past the cache TTL: the next request is checked again
        refused = await client.post("/mcp", json=PING, headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == -32001


# -- URL policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/x", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
        ("http://user:pass@example.com/", "credentials"),
        ("http:///no-host", "no host"),
        ("http://127.0.0.1:9880/agent/ad.json", "non-public"),
        ("http://10.1.2.3/", "non-public"),
        ("http://169.254.169.254/latest/meta-data/", "non-public"),
        ("http://[::1]:80/", "non-public"),
        ("http://0.0.0.0/", "non-public"),
        ("http://localhost:9880/", "non-public"),
        ("http://example.com/" + "a" * 3000, "longer"),
    ],
)
async def test_default_policy_refuses(url: str, fragment: str) -> None:
    with pytest.raises(ANPToolError) as refused:
        await URLPolicy().check(url)
    assert refused.value.code == "URL_REFUSED"
    assert fragment in refused.value.message


async def test_host_lists_and_private_opt_in() -> None:
    policy = URLPolicy(allow_private=True, allowed_hosts=[".example.com", "127.0.0.1"])
    await policy.check("http://127.0.0.1:9880/agent/ad.json")
    await policy.check("https://agents.example.com/ad.json")
    await policy.check("https://example.com/ad.json")
    with pytest.raises(ANPToolError, match="allow list"):
        await URLPolicy(allowed_hosts=[".example.com"]).check("https://example.org/ad.json")
    with pytest.raises(ANPToolError, match="allow list"):
        await policy.check("http://10.0.0.1/")  # an address entry admits only that address
    denied = URLPolicy(allow_private=True, denied_hosts=["blocked.test"])
    with pytest.raises(ANPToolError, match="deny list"):
        await denied.check("http://blocked.test/")
    public = URLPolicy()
    await public.check("http://93.184.216.34/")  # a public literal needs no DNS


@asynccontextmanager
async def hostile_server() -> AsyncIterator[str]:
    """Endpoints that misbehave: huge bodies, redirects to private ranges, silence."""
    hang_up = asyncio.Event()

    async def huge(request: Request) -> Response:
        return PlainTextResponse("x" * 300_000)

    async def huge_streamed(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"y" * 10_000

        return StreamingResponse(chunks(), media_type="text/plain")

    async def to_metadata(request: Request) -> Response:
        return RedirectResponse("http://169.254.169.254/latest/meta-data/")

    async def silent(request: Request) -> Response:
        await hang_up.wait()  # answers only when the test is over
        return PlainTextResponse("too late")

    app = Starlette(
        routes=[
            Route("/huge", huge),
            Route("/huge-streamed", huge_streamed),
            Route("/redirect", to_metadata),
            Route("/silent", silent),
        ]
    )
    async with serve(app, port=free_port()) as base_url:
        try:
            yield base_url
        finally:
            hang_up.set()


async def fetch(url: str, policy: URLPolicy) -> dict[str, Any]:
    """Run anp_fetchDoc's handler with a throwaway signer; return the tool error payload."""
    import tempfile
    from pathlib import Path

    from mcp2anp_middleware import ANPToolkit, SessionState, ensure_dev_identity

    toolkit = ANPToolkit(url_policy=policy)
    with tempfile.TemporaryDirectory() as tmp:
        state = SessionState("s" * 43, ensure_dev_identity(Path(tmp)), created_at=0.0)
        handler = toolkit.handler_for(state)
        try:
            await handler.fetch_doc(url)
        except ANPToolError as exc:
            error: dict[str, Any] = exc.to_payload()["error"]
            return error
        finally:
            await toolkit.http.aclose()
    raise AssertionError("the fetch should have failed")


async def test_oversize_responses_and_private_redirects_are_refused() -> None:
    policy = URLPolicy(allow_private=True, max_response_bytes=100_000, timeout=0.5)
    async with hostile_server() as base_url:
        declared = await fetch(f"{base_url}/huge", policy)
        streamed = await fetch(f"{base_url}/huge-streamed", policy)
        silent = await fetch(f"{base_url}/silent", policy)
        allowed_local = URLPolicy(allow_private=True, allowed_hosts=["127.0.0.1"])
        redirected = await fetch(f"{base_url}/redirect", allowed_local)
    assert declared["code"] == streamed["code"] == "RESPONSE_TOO_LARGE"
    assert silent["code"] == "TIMEOUT"
    assert redirected["code"] == "URL_REFUSED"  # the redirect hop is checked again


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/",  # short form of 127.0.0.1
        "http://2130706433/",  # decimal form of 127.0.0.1
        "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
        "http://[::127.0.0.1]/",  # IPv4-compatible
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    ],
)
async def test_other_spellings_of_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(ANPToolError) as refused:
        await URLPolicy().check(url)
    assert refused.value.code == "URL_REFUSED"
    # deny lists match addresses, however they are spelled, also when private ranges are allowed
    denied = URLPolicy(allow_private=True, denied_hosts=["127.0.0.0/8", "169.254.169.254"])
    with pytest.raises(ANPToolError, match="deny list"):
        await denied.check(url)
