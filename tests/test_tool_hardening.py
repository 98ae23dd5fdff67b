"""Hostile agents against the ANP tools (issue #10): deep JSON, cache memory, request-line
injection through URLs, and IPv6 spellings of private IPv4 addresses.

Every test talks only to servers on 127.0.0.1; policy checks on other literal addresses are refused
(or accepted) before any connection is made.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp2anp_middleware import ANPToolkit, SessionState, URLPolicy, ensure_dev_identity
from mcp2anp_middleware.anp_tools.documents import CacheBudget, DocumentCache
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.anp_tools.http import POOL_IDLE_SECONDS, ANPHttpClient, HttpResult
from mcp2anp_middleware.anp_tools.toolkit import ATTACHMENT, _document_payload
from mcp2anp_middleware.hosting import ANPMiddleware
from mcp2anp_middleware.sessions.clock import ManualClock

from .servers import free_port, serve
from .tool_results import err, ok

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------- helpers


def nested(depth: int, leaf: Any = 1) -> str:
    """JSON text of ``depth`` arrays and objects nested in each other around ``leaf``."""
    opening = "".join('{"k":' if i % 2 else "[" for i in range(depth))
    closing = "".join("}" if i % 2 else "]" for i in reversed(range(depth)))
    return opening + json.dumps(leaf) + closing


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def json_response(text: str | bytes, content_type: str = "application/json") -> Response:
    return Response(text, media_type=content_type)


@asynccontextmanager
async def tool_stack(
    tmp_path: Path, routes: list[Route], *, mode: str = "auto", **options: Any
) -> AsyncIterator[tuple[str, Client]]:
    """ANPMiddleware (development mode) in front of ``routes`` on loopback uvicorn, and an
    official MCP client session to it; yields the base URL and the client."""
    port = free_port()
    options.setdefault("url_policy", URLPolicy(allow_private=True))
    middleware = ANPMiddleware(Starlette(routes=routes), data_dir=tmp_path / "data", **options)
    async with serve(middleware, port=port) as base_url, httpx2.AsyncClient() as http:
        transport = streamable_http_client(f"{base_url}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            yield base_url, client


@dataclass
class RawAgent:
    """A loopback HTTP/1.1 server that records each raw request head and answers from a table.

    Starlette would reject or normalise a malformed request line before a test could see it; this
    server keeps the bytes exactly as they arrived. ``answers`` maps the raw request target to
    ``(status, header lines, body)``, header lines as raw bytes; anything else gets a small JSON
    document.
    """

    answers: dict[bytes, tuple[int, list[bytes], bytes]] = field(default_factory=dict)
    heads: list[bytes] = field(default_factory=list)

    @property
    def request_lines(self) -> list[bytes]:
        return [head.split(b"\r\n", 1)[0] for head in self.heads]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                target = head.split(b" ")[1] if head.count(b" ") >= 2 else b""
                status, headers, body = self.answers.get(
                    target, (200, [b"Content-Type: application/json"], b'{"ok": true}')
                )
                lines = [f"HTTP/1.1 {status} X".encode(), *headers]
                lines.append(f"Content-Length: {len(body)}".encode())
                writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.close()
            await server.wait_closed()


@asynccontextmanager
async def session_handler(
    tmp_path: Path, policy: URLPolicy | None = None, **options: Any
) -> AsyncIterator[tuple[ANPToolkit, SessionState]]:
    """A toolkit and one session (dev DID) whose handler the test drives directly."""
    toolkit = ANPToolkit(url_policy=policy or URLPolicy(allow_private=True), **options)
    state = SessionState("s" * 43, ensure_dev_identity(tmp_path / "data"), created_at=0.0)
    try:
        yield toolkit, state
    finally:
        await toolkit.http.aclose()


async def tool_error(call: Callable[[], Any]) -> ANPToolError:
    with pytest.raises(ANPToolError) as caught:
        await call()
    return caught.value


# --------------------------------------------------------------------------- 3. deep JSON


DEEP = 300  # what the attack used: past the SDK serializer's limit (about 250)
LIMIT = 100  # the documented bound (MAX_JSON_DEPTH)


def deep_routes() -> list[Route]:
    deep = nested(DEEP)

    def answer(text: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return json_response(text)

        return endpoint

    rpc = '{"jsonrpc": "2.0", "id": 1, '
    return [
        Route("/deep.json", answer(deep)),
        Route("/limit.json", answer(nested(LIMIT))),
        Route("/over-limit.json", answer(nested(LIMIT + 1))),
        Route("/very-deep.json", answer("[" * 100_000 + "]" * 100_000)),
        Route("/rpc/result", answer(rpc + f'"result": {deep}}}'), methods=["POST"]),
        Route(
            "/rpc/error-data",
            answer(rpc + f'"error": {{"code": -1, "message": "m", "data": {deep}}}}}'),
            methods=["POST"],
        ),
        Route(
            "/rpc/error-code",
            answer(rpc + f'"error": {{"code": {deep}, "message": "m"}}}}'),
            methods=["POST"],
        ),
        Route(
            "/rpc/id",
            answer(f'{{"jsonrpc": "2.0", "id": {deep}, "result": 1}}'),
            methods=["POST"],
        ),
        Route(
            "/surrogate.json", answer('{"name": "\\ud800", "\\udfff": "x", "ok": "\\ud83d\\ude00"}')
        ),
        Route(
            "/rpc/surrogate",
            answer(rpc + '"result": {"\\udc80": "lone"}}'),
            methods=["POST"],
        ),
    ]


async def test_deep_json_from_an_agent_is_a_tool_error_through_the_stack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with tool_stack(tmp_path, deep_routes()) as (base, client):
        fetched = err(await client.call_tool("anp_fetchDoc", {"url": f"{base}/deep.json"}))
        assert fetched["code"] == "RESPONSE_TOO_DEEP"
        assert str(LIMIT) in fetched["message"]
        for path in ("/rpc/result", "/rpc/error-data", "/rpc/error-code", "/rpc/id"):
            invoked = err(
                await client.call_tool(
                    "anp_invokeOpenRPC", {"endpoint": f"{base}{path}", "method": "m"}
                )
            )
            assert invoked["code"] == "RESPONSE_TOO_DEEP", path
        at_limit = ok(await client.call_tool("anp_fetchDoc", {"url": f"{base}/limit.json"}))
        assert depth_of(at_limit["document"]) == LIMIT
        over = err(await client.call_tool("anp_fetchDoc", {"url": f"{base}/over-limit.json"}))
        assert over["code"] == "RESPONSE_TOO_DEEP"
        very = err(await client.call_tool("anp_fetchDoc", {"url": f"{base}/very-deep.json"}))
        assert very["code"] == "RESPONSE_TOO_DEEP"
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]


async def test_lone_surrogates_from_an_agent_are_not_json_through_the_stack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud800"); such a string cannot be encoded as UTF-8,
    so it would break the tool result exactly like deep nesting does."""
    caplog.set_level(logging.WARNING)
    async with tool_stack(tmp_path, deep_routes()) as (base, client):
        fetched = ok(await client.call_tool("anp_fetchDoc", {"url": f"{base}/surrogate.json"}))
        assert isinstance(fetched["document"], str)  # served as text, not as parsed JSON
        assert "\\ud800" in fetched["document"] and fetched["links"] == []
        invoked = err(
            await client.call_tool(
                "anp_invokeOpenRPC", {"endpoint": f"{base}/rpc/surrogate", "method": "m"}
            )
        )
        assert invoked["code"] == "INVALID_RESPONSE"
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]


async def test_undecodable_header_bytes_do_not_break_the_result(tmp_path: Path) -> None:
    """aiohttp keeps header bytes that are not UTF-8 as lone surrogates; the content type the
    tool reports must still be encodable."""
    agent = RawAgent()
    agent.answers[b"/doc"] = (200, [b"Content-Type: application/\xff\xfejson"], b'{"a": 1}')
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        payload = await toolkit.handler_for(state).fetch_doc(f"{base}/doc")
    payload["content_type"].encode("utf-8")  # would raise on a lone surrogate
    assert payload["content_type"].startswith("application/")
    assert payload["document"] == {"a": 1}


async def test_deep_json_is_refused_without_recursion_in_the_handler(tmp_path: Path) -> None:
    """Far deeper than Python's recursion limit: still the stable code, not INTERNAL_ERROR."""
    agent = RawAgent()
    agent.answers[b"/deep"] = (200, [], b"[" * 200_000 + b"]" * 200_000)
    deep_rpc = b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * 5000 + b"]" * 5000 + b"}"
    agent.answers[b"/rpc"] = (200, [], deep_rpc)
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        fetched = await tool_error(lambda: handler.fetch_doc(f"{base}/deep"))
        invoked = await tool_error(lambda: handler.invoke_openrpc(f"{base}/rpc", "m", None, 1))
    assert fetched.code == invoked.code == "RESPONSE_TOO_DEEP"
    assert fetched.details["limit"] == LIMIT


# --------------------------------------------------------------------------- 7. request targets


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a X-Injected: 1",
        "http://127.0.0.1/a\r\nX-Injected: 1",
        "http://127.0.0.1/a\nb",
        "http://127.0.0.1/a\tb",
        "http://127.0.0.1/a?q=1 HTTP/1.1",
        "http://127.0.0.1/a#frag ment",
        "http://127.0.0.1/a\x00b",
        "http://127.0.0.1/a\x7fb",
        "http://127.0.0.1/a\u0085b",  # NEL
        "http://127.0.0.1/a\u2028b",  # line separator
        "http://127.0.0.1/a\u00a0b",  # no-break space
        "http://127.0.0.1/a\u200bb",  # zero-width space (a format character)
        "http://127.0.0.1/a\ud800b",  # a lone surrogate cannot be encoded
        " http://127.0.0.1/a",
        "http://127.0.0.1/a ",
        "http://127.0.0.1 /a",
    ],
)
async def test_whitespace_and_control_characters_are_refused(url: str) -> None:
    with pytest.raises(ANPToolError) as refused:
        await URLPolicy(allow_private=True).check(url)
    assert refused.value.code == "URL_REFUSED"
    assert "whitespace or control" in refused.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://exa mple.com/",
        "http://bücher.example/",  # IDNs must be given in their ASCII (xn--) form
        "http://exa\\mple.com/",
        "http://exa%2fmple.com/",
        'http://exa"mple.com/',
        "http://[::1/",
    ],
)
async def test_malformed_hosts_are_refused(url: str) -> None:
    with pytest.raises(ANPToolError) as refused:
        await URLPolicy(allow_private=True).check(url)
    assert refused.value.code == "URL_REFUSED"


async def test_raw_request_line_is_exactly_the_checked_url(tmp_path: Path) -> None:
    agent = RawAgent()
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        port = base.rsplit(":", 1)[1]
        agent.answers[b"/redirect"] = (302, [f"Location: /b X-Injected: {port}".encode()], b"")

        injected = await tool_error(lambda: handler.fetch_doc(f"{base}/a X-Injected: 1"))
        rpc = await tool_error(
            lambda: handler.invoke_openrpc(f"{base}/rpc X-Injected: 1", "m", None, 1)
        )
        redirected = await tool_error(lambda: handler.fetch_doc(f"{base}/redirect"))
        assert injected.code == rpc.code == redirected.code == "URL_REFUSED"
        assert agent.request_lines == [b"GET /redirect HTTP/1.1"]  # the only request sent

        # Characters a request target may not carry raw are sent percent-encoded, and the
        # tool reports (and signs) the URL it actually sent.
        payload = await handler.fetch_doc(f'{base}/ü/"x"<y>?q=é&r={{1}}|^`#frag')
    expected = "/%C3%BC/%22x%22%3Cy%3E?q=%C3%A9&r=%7B1%7D%7C%5E%60"
    assert agent.request_lines[-1] == f"GET {expected} HTTP/1.1".encode()
    assert payload["url"] == f"{base}{expected}#frag"


async def test_malformed_links_and_redirects_from_an_agent_are_not_a_crash(tmp_path: Path) -> None:
    """An unbalanced IPv6 bracket (which ``urljoin`` refuses) in a document's link or an OpenRPC
    server's URL is no link to follow; in a redirect's ``Location`` it is an HTTP error. Before,
    either lost the whole call as an internal error with a traceback."""
    document = {
        "interfaces": [{"url": "http://[::1"}, {"url": "/good.json"}],
        "openrpc": "1.3.2",
        "servers": [{"url": "http://[::1/rpc"}],
        "methods": [{"name": "echo", "params": []}],
    }
    agent = RawAgent()
    as_json = [b"Content-Type: application/json"]
    agent.answers[b"/doc"] = (200, as_json, json.dumps(document).encode())
    agent.answers[b"/moved"] = (302, [b"Location: http://[::1/"], b"")
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        payload = await handler.fetch_doc(f"{base}/doc")
        moved = await tool_error(lambda: handler.fetch_doc(f"{base}/moved"))
    assert [link["url"] for link in payload["links"]] == [f"{base}/good.json"]
    assert [method["name"] for method in payload["methods"]] == ["echo"]
    assert moved.code == "HTTP_ERROR"


def test_an_agents_odd_json_is_read_without_a_crash() -> None:
    """OpenRPC ``params`` that are no list name no parameters; ``NaN`` or an infinity (which no
    result could carry as JSON) makes the body text, not JSON."""
    methods = [{"name": "m", "params": 1}, {"name": "n", "params": True}]
    document = {"openrpc": "1.3.2", "methods": methods}
    odd = HttpResult("http://h/d", 200, "application/json", json.dumps(document).encode())
    payload = _document_payload(odd)
    assert [(m["name"], m["params"]) for m in payload["methods"]] == [("m", []), ("n", [])]
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"x": ' + constant + b"}"
        payload = _document_payload(HttpResult("http://h/d", 200, "application/json", body))
        assert payload["document"] == body.decode() and payload["links"] == []


async def test_a_host_label_longer_than_dns_allows_is_refused() -> None:
    """The resolver's IDNA codec refuses it (a ``UnicodeError``, which was a crash)."""
    for host in ("a" * 64 + ".example", "a..example"):
        with pytest.raises(ANPToolError) as refused:
            await URLPolicy().check(f"http://{host}/")
        assert refused.value.code == "URL_REFUSED"


async def test_check_returns_the_url_to_send() -> None:
    policy = URLPolicy(allow_private=True)
    plain = "http://127.0.0.1:9/a/b?c=d%20e#f"
    assert await policy.check(plain) == plain  # nothing to encode: unchanged, byte for byte
    assert await policy.check("http://127.0.0.1:9/\u00e9") == "http://127.0.0.1:9/%C3%A9"
    assert await policy.check("http://127.0.0.1:9/?") == "http://127.0.0.1:9/?"


# --------------------------------------------------------------------------- 8. IPv6 embeddings

MAPPED = "::ffff:{}"
COMPATIBLE = "::{}"
SIIT = "::ffff:0:{}"
NAT64 = "64:ff9b::{}"
LOCAL_NAT64 = "64:ff9b:1::{}"


def sixtofour(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1))


def teredo(server: ipaddress.IPv4Address, client: ipaddress.IPv4Address) -> str:
    """A Teredo address: prefix, server, flags and port, then the client obfuscated (inverted)."""
    value = (0x20010000 << 96) | (int(server) << 64) | (0x8000 << 48) | (0xFFFF << 32)
    return str(ipaddress.IPv6Address(value | (int(client) ^ 0xFFFFFFFF)))


def forms(v4: ipaddress.IPv4Address) -> dict[str, str]:
    """Every IPv6 spelling that carries ``v4``, keyed by name."""
    public = ipaddress.IPv4Address("192.0.43.10")
    return {
        "mapped": MAPPED.format(v4),
        "compatible": COMPATIBLE.format(v4),
        "siit": SIIT.format(v4),
        "nat64": NAT64.format(v4),
        "local-nat64": LOCAL_NAT64.format(v4),
        "6to4": sixtofour(v4),
        "teredo-client": teredo(public, v4),
        "teredo-server": teredo(v4, public),
    }


PRIVATE_V4 = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "100.64.0.1", "0.0.0.0"]


async def refusal(policy: URLPolicy, url: str) -> str | None:
    """The policy's URL_REFUSED message for ``url``, or None if it may be fetched. Literal
    addresses only: no DNS, and no connection either way."""
    try:
        await policy.check(url)
    except ANPToolError as exc:
        assert exc.code == "URL_REFUSED", exc.message
        return exc.message
    return None


@pytest.mark.parametrize("v4", PRIVATE_V4)
async def test_every_ipv6_form_of_a_private_ipv4_is_refused(v4: str) -> None:
    for name, v6 in forms(ipaddress.IPv4Address(v4)).items():
        message = await refusal(URLPolicy(), f"http://[{v6}]/")
        assert message is not None and "non-public" in message, (name, v6)


async def test_ipv6_forms_of_a_public_ipv4_are_judged_by_it() -> None:
    for name, v6 in forms(ipaddress.IPv4Address("192.0.43.10")).items():
        message = await refusal(URLPolicy(), f"http://[{v6}]/")
        if name == "local-nat64":  # RFC 8215: local use, never global whatever it carries
            assert message is not None and "non-public" in message, v6
            assert await refusal(URLPolicy(allow_private=True), f"http://[{v6}]/") is None
        else:
            assert message is None, (name, v6, message)


@pytest.mark.parametrize("v4", ["169.254.169.254", "192.0.43.10"])
async def test_deny_list_sees_the_embedded_ipv4(v4: str) -> None:
    policy = URLPolicy(allow_private=True, denied_hosts=[f"{v4}/32"])
    for name, v6 in forms(ipaddress.IPv4Address(v4)).items():
        message = await refusal(policy, f"http://[{v6}]/")
        assert message is not None and "deny list" in message, (name, v6)


@pytest.mark.parametrize(
    ("denied", "v6"),
    [
        ("64:ff9b::/96", "64:ff9b::c000:2b0a"),
        ("64:ff9b:1::/48", "64:ff9b:1::c000:2b0a"),
        ("2002::/16", "2002:c000:2b0a::1"),
        (
            "2001::/32",
            teredo(ipaddress.IPv4Address("192.0.43.10"), ipaddress.IPv4Address("8.8.8.8")),
        ),
        ("::ffff:0:0/96", "::ffff:192.0.43.10"),
        ("::ffff:0:0:0/96", "::ffff:0:192.0.43.10"),
        ("::ffff:192.0.43.10", "::ffff:192.0.43.10"),
        ("::1", "::1"),
    ],
)
async def test_deny_list_sees_the_ipv6_address_itself(denied: str, v6: str) -> None:
    with pytest.raises(ANPToolError, match="deny list"):
        await URLPolicy(allow_private=True, denied_hosts=[denied]).check(f"http://[{v6}]/")


async def test_allow_list_networks_judge_embedded_and_ipv6_forms() -> None:
    by_v4 = URLPolicy(allow_private=True, allowed_hosts=["10.0.0.0/8"])
    await by_v4.check("http://[::ffff:10.1.2.3]/")
    await by_v4.check("http://[64:ff9b::10.1.2.3]/")
    with pytest.raises(ANPToolError, match="allow list"):
        await by_v4.check("http://[64:ff9b::11.1.2.3]/")
    by_v6 = URLPolicy(allow_private=True, allowed_hosts=["64:ff9b::/96"])
    await by_v6.check("http://[64:ff9b::10.1.2.3]/")
    with pytest.raises(ANPToolError, match="allow list"):
        await by_v6.check("http://[::ffff:10.1.2.3]/")


ipv4s = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v4=ipv4s)
def test_embedded_forms_are_judged_like_the_ipv4_they_carry(v4: ipaddress.IPv4Address) -> None:
    async def run() -> None:
        deny = URLPolicy(allow_private=True, denied_hosts=[str(v4)])
        for name, v6 in forms(v4).items():
            url = f"http://[{v6}]/"
            allowed = v4.is_global and name != "local-nat64"  # RFC 8215: never global
            assert (await refusal(URLPolicy(), url) is None) is allowed, (name, v6)
            assert await refusal(deny, url) is not None, (name, v6)

    asyncio.run(run())  # hypothesis drives a plain function; the checks need a loop


# --------------------------------------------------------------------------- 4. document cache


def small_objects(size: int, seed: int) -> bytes:
    """About ``size`` bytes of JSON made of tiny objects: the shape that grows most when parsed."""
    item = b'{"a":%d}' % seed
    return b"[" + b",".join([item] * (size // (len(item) + 1))) + b"]"


def stored(value: bytes) -> HttpResult:
    return HttpResult(url="http://agent.test/x", status=200, content_type="", body=value)


def cache(
    budget: CacheBudget, clock: ManualClock, *, max_bytes: int = 1000, ttl: float = 60.0
) -> DocumentCache[HttpResult]:
    return DocumentCache(ttl=ttl, max_entries=32, max_bytes=max_bytes, budget=budget, clock=clock)


def test_cache_keeps_to_its_session_byte_budget() -> None:
    budget, clock = CacheBudget(10_000), ManualClock()
    session = cache(budget, clock, max_bytes=1000)
    for name in "abc":
        assert session.put(name, stored(b"x" * 400), 400)
        clock.advance(1)
    assert session.used == budget.used == 800  # "a" made room for "c"
    assert session.get("a") is None and session.get("b") is not None
    assert session.get("c") is not None


def test_process_budget_is_shared_by_all_sessions() -> None:
    budget, clock = CacheBudget(1000), ManualClock()
    first, second = cache(budget, clock), cache(budget, clock)
    assert first.put("a", stored(b"1"), 600)
    clock.advance(1)
    assert second.put("b", stored(b"2"), 600)  # the oldest entry of any session makes room
    assert budget.used == 600 <= budget.max_bytes
    assert first.get("a") is None and first.used == 0 and len(first) == 0
    assert second.get("b") is not None


def test_expired_entries_are_purged_on_insert_without_being_read() -> None:
    budget, clock = CacheBudget(10_000), ManualClock()
    idle, busy = cache(budget, clock), cache(budget, clock)
    assert idle.put("old", stored(b"1"), 100)
    assert busy.put("old", stored(b"1"), 100)
    clock.advance(61)  # past the TTL; nobody reads either entry again
    assert busy.put("new", stored(b"2"), 100)
    assert len(idle) == 0 and idle.used == 0  # another session's insert purged it
    assert len(busy) == 1 and busy.used == 100
    assert budget.used == 100 and len(budget) == 1


def test_an_entry_larger_than_a_budget_is_not_cached_and_evicts_nothing() -> None:
    budget, clock = CacheBudget(2000), ManualClock()
    session = cache(budget, clock, max_bytes=1000)
    assert session.put("small", stored(b"1"), 500)
    assert not session.put("session-sized", stored(b"2"), 1001)
    roomy = cache(budget, clock, max_bytes=10_000)
    assert not roomy.put("process-sized", stored(b"3"), 2001)
    assert session.get("small") is not None and budget.used == 500
    assert session.get("session-sized") is None and roomy.get("process-sized") is None


def test_a_dropped_cache_stops_counting_against_the_process_budget() -> None:
    budget, clock = CacheBudget(1000), ManualClock()
    gone = cache(budget, clock)
    assert gone.put("a", stored(b"1"), 700)
    del gone
    gc.collect()
    assert budget.used == 0 and len(budget) == 0
    assert cache(budget, clock).put("b", stored(b"2"), 700)  # the room is there again


async def test_session_end_releases_its_documents(tmp_path: Path) -> None:
    """A session that ends drops its handler (the toolkit's event listener detaches it); nothing
    else has to tell the budget."""
    budget = CacheBudget(10_000_000)
    agent = RawAgent()
    async with (
        agent.running() as base,
        session_handler(tmp_path, document_cache_budget=budget) as (toolkit, state),
    ):
        await toolkit.handler_for(state).fetch_doc(f"{base}/doc")
        assert budget.used > 0
        state.detach(ATTACHMENT)  # what the toolkit's listener does when a session ends
        gc.collect()
        assert budget.used == 0


async def test_cache_hit_parses_the_stored_body_again(tmp_path: Path) -> None:
    agent = RawAgent()
    interface = b'{"interfaces": [{"url": "/rpc.json", "protocol": "openrpc"}]}'
    agent.answers[b"/ad.json"] = (200, [b"Content-Type: application/json"], interface)
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        first = await handler.fetch_doc(f"{base}/ad.json")
        first["document"]["interfaces"].clear()  # a caller changing its result
        second = await handler.fetch_doc(f"{base}/ad.json")
    assert len(agent.request_lines) == 1  # served from the cache
    assert second.pop("cached") is True and "cached" not in first
    assert second["document"]["interfaces"][0]["url"] == "/rpc.json"
    assert second["links"] == first["links"] and second["links"][0]["kind"] == "interface"


async def test_cached_documents_take_their_raw_size_in_memory(tmp_path: Path) -> None:
    """What the cache keeps is bounded by its byte budget: raw bodies, not parsed objects (a body
    of tiny objects grows about twentyfold when parsed)."""
    agent = RawAgent()
    bodies = {f"/doc{i}".encode(): small_objects(128 * 1024, i) for i in range(4)}
    for target, body in bodies.items():
        agent.answers[target] = (200, [b"Content-Type: application/json"], body)
    budget = CacheBudget(16 * 1024 * 1024)
    async with (
        agent.running() as base,
        session_handler(tmp_path, document_cache_budget=budget) as (toolkit, state),
    ):
        handler = toolkit.handler_for(state)
        await handler.fetch_doc(f"{base}/warm-up")  # pools and lazy state before measuring
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for target in bodies:
                await handler.fetch_doc(f"{base}{target.decode()}")
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(agent.request_lines) == 5
        crawler = toolkit.handler_for(state).crawler
        assert crawler.cache is not None
        assert len(crawler.cache) == 5  # the warm-up document too
    raw = sum(len(body) for body in bodies.values())
    assert budget.used >= raw
    assert retained < 1.5 * raw, (retained, raw)


async def test_toolkit_cache_options_reach_each_session(tmp_path: Path) -> None:
    budget = CacheBudget(5000)
    agent = RawAgent()
    agent.answers[b"/big"] = (200, [b"Content-Type: application/json"], small_objects(6000, 1))
    async with (
        agent.running() as base,
        session_handler(tmp_path, document_cache_bytes=3000, document_cache_budget=budget) as (
            toolkit,
            state,
        ),
    ):
        handler = toolkit.handler_for(state)
        await handler.fetch_doc(f"{base}/big")  # larger than the session's budget: not kept
        again = await handler.fetch_doc(f"{base}/big")
        await handler.fetch_doc(f"{base}/small")
        assert "cached" not in again and len(agent.request_lines) == 3
        assert 0 < budget.used <= 3000


async def test_a_cache_hit_gets_the_same_verdict_as_the_first_fetch(tmp_path: Path) -> None:
    """The cache keeps bytes and parses them again; a body that was not JSON the first time (a
    lone surrogate) must not come back as JSON that cannot be encoded."""
    agent = RawAgent()
    agent.answers[b"/lone"] = (200, [b"Content-Type: application/json"], b'{"a": "\\ud800"}')
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        first = await handler.fetch_doc(f"{base}/lone")
        again = await handler.fetch_doc(f"{base}/lone")
    assert again.pop("cached") is True and again == first
    assert first["document"] == '{"a": "\\ud800"}'
    json.dumps(again, ensure_ascii=False).encode()


async def test_unencodable_params_are_an_invalid_argument(tmp_path: Path) -> None:
    agent = RawAgent()
    async with agent.running() as base, session_handler(tmp_path) as (toolkit, state):
        handler = toolkit.handler_for(state)
        refused = await tool_error(
            lambda: handler.invoke_openrpc(f"{base}/rpc", "m", {"text": "\ud800"}, 1)
        )
    assert refused.code == "INVALID_ARGUMENT" and agent.heads == []


async def test_the_length_limit_applies_to_the_url_as_sent() -> None:
    policy = URLPolicy(allow_private=True, max_url_length=100)
    await policy.check("http://127.0.0.1/" + "a" * 80)
    with pytest.raises(ANPToolError, match="once percent-encoded"):
        await policy.check("http://127.0.0.1/" + "\u00e9" * 40)  # 57 characters, 257 encoded


async def test_closed_sessions_release_the_process_budget_through_the_stack(
    tmp_path: Path,
) -> None:
    budget = CacheBudget(10_000_000)
    toolkit = ANPToolkit(url_policy=URLPolicy(allow_private=True), document_cache_budget=budget)
    async with (
        tool_stack(tmp_path, deep_routes(), mode="legacy", toolkit=toolkit) as (base, client),
        httpx2.AsyncClient() as http,
    ):
        transport = streamable_http_client(f"{base}/mcp", http_client=http)
        async with Client(transport, mode="legacy") as other:
            ok(await other.call_tool("anp_fetchDoc", {"url": f"{base}/limit.json"}))
            shared = budget.used
            ok(await client.call_tool("anp_fetchDoc", {"url": f"{base}/limit.json"}))
            assert budget.used == 2 * shared > 0  # one budget, two sessions' entries
        gc.collect()
        assert budget.used == shared  # the other session was closed (DELETE)


async def test_closing_a_crawler_releases_its_documents_at_once(tmp_path: Path) -> None:
    budget = CacheBudget(10_000_000)
    agent = RawAgent()
    async with (
        agent.running() as base,
        session_handler(tmp_path, document_cache_budget=budget) as (toolkit, state),
    ):
        handler = toolkit.handler_for(state)
        await handler.fetch_doc(f"{base}/doc")
        assert budget.used > 0
        handler.crawler.close()  # the crawler is still referenced: only close() frees it
        assert budget.used == 0 and handler.crawler.cached(f"{base}/doc") is None


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:9880/agent/ad.json", True),
        ("HTTP://127.0.0.1:9880/agent/x?y=1", True),
        ("http://127.0.0.1:9880/mcp", False),  # same origin, outside the listed path
        ("http://127.0.0.1:9880/agent/../mcp", False),
        ("http://127.0.0.1:9880/agent/%2E%2E/mcp", False),
        ("http://127.0.0.1:9881/agent/ad.json", False),  # another port
        ("https://127.0.0.1:9880/agent/ad.json", False),  # another scheme
        ("http://127.0.0.2:9880/agent/ad.json", False),  # another host
    ],
)
async def test_private_origins_open_exactly_one_place(url: str, allowed: bool) -> None:
    policy = URLPolicy(private_origins=("http://127.0.0.1:9880/agent/",))
    if allowed:
        assert await policy.check(url)
    else:
        with pytest.raises(ANPToolError) as refused:
            await policy.check(url)
        assert refused.value.code == "URL_REFUSED"


async def test_the_pool_lets_idle_connections_go_before_common_agents_close_them() -> None:
    """An agent on uvicorn (or Node) closes a keep-alive connection idle for 5 s; a pool that
    kept it longer could send a call on it as it closes (``ServerDisconnectedError``)."""
    client = ANPHttpClient(URLPolicy())
    try:
        connector = client._http().connector
        assert connector is not None
        assert connector._keepalive_timeout == POOL_IDLE_SECONDS
        assert uvicorn.Config("app:app").timeout_keep_alive > POOL_IDLE_SECONDS
    finally:
        await client.aclose()
