"""5. Tool calls through the whole stack: pooled connections vs a new connection per call.

Stack (all real, on loopback, one event loop): an MCP client (httpx, keep-alive, raw JSON-RPC
``tools/call`` with the session's ``Mcp-Session-Id``) -> uvicorn -> ``ANPMiddleware`` -> the SDK
server -> ``anp_fetchDoc`` / ``anp_invokeOpenRPC`` -> uvicorn -> the demo ANP agent (DID WBA
checked for real; after the first signed call the agent's bearer token is used, as in
production). The document cache is off (``document_cache_size=0``) so every ``anp_fetchDoc``
really fetches.

Three MCP stacks run side by side and differ only in how ``ANPHttpClient`` sends:

- pooled: this package's default, one shared keep-alive pool (connections reused);
- anp-style baseline (the target's baseline): what anp's crawler does (``ANPClient.fetch_url``),
  a new ``aiohttp.ClientSession`` per request, so a new TCP (and TLS) connection per call; the
  signing, URL policy, redirects and size limit around it are this package's, unchanged;
- new-connection baseline: the same client with keep-alive off (a new connection per request), which
  isolates the connection (and TLS handshake) alone, without the cost of a client per call.

The agent runs twice, over plain HTTP and over HTTPS (self-signed certificate made here, trusted
by the client): ANP agents are public https services (``did:wba`` is resolved over https), so the
HTTPS rows are the realistic ones and the target row; the HTTP rows show loopback without TLS.
Throughput = sequential tool calls per second; the two stacks alternate in batches and the ratio
is the median of paired ratios (pooled / baseline).

Then the DID key: ``serialization.load_pem_private_key`` is wrapped with a counter (and
``DidCredential.sign`` too) while new sessions make tool calls, beside anp's own
``DIDWbaAuthHeader`` signing the same number of times.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import logging
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvicorn
from anp.authentication import DIDWbaAuthHeader
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from example_app.demo_agent import StaticDidResolver, create_demo_agent, create_demo_identity
from mcp2anp_middleware import ANPToolkit, SessionConfig, URLPolicy
from mcp2anp_middleware.anp_tools.credentials import DidCredential, load_credential
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.anp_tools.http import ANPHttpClient, HttpResult
from mcp2anp_middleware.anp_tools.signing import SessionSigner
from mcp2anp_middleware.authentication.base import StaticConfigAuthenticator
from mcp2anp_middleware.hosting import ANPMiddleware
from tests.servers import free_port

from .common import Result, jsonrpc_answer, log, median, run_module, spread

MCP_HEADERS = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
    "mcp-protocol-version": "2025-11-25",
}


# -- servers ------------------------------------------------------------------------------------


@asynccontextmanager
async def serve(app: Any, port: int, tls: tuple[Path, Path] | None = None) -> AsyncIterator[None]:
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])}
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await task


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# -- MCP stacks ---------------------------------------------------------------------------------


class McpSession:
    """A raw MCP client session (JSON-RPC over one keep-alive httpx client)."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.session_id = ""
        self.next_id = 1

    async def initialize(self) -> None:
        params = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        }
        answer = await self._post("initialize", params)
        self.session_id = answer.headers["mcp-session-id"]

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        answer = await self._post("tools/call", {"name": tool, "arguments": arguments})
        content_type = answer.headers.get("content-type", "")
        result: dict[str, Any] = jsonrpc_answer(answer.content, content_type)["result"]
        if result.get("isError"):
            raise RuntimeError(f"{tool} failed: {result}")
        return result

    async def _post(self, method: str, params: dict[str, Any]) -> httpx.Response:
        self.next_id += 1
        body = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        headers = dict(MCP_HEADERS)
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        answer = await self.http.post(self.url, content=json.dumps(body), headers=headers)
        answer.raise_for_status()
        return answer


class AnpStyleHttpClient(ANPHttpClient):
    """Sends each request the way anp's ``ANPClient.fetch_url`` does: a new
    ``aiohttp.ClientSession`` (so a new connection) per request, closed after it."""

    def __init__(self, policy: URLPolicy, verify: ssl.SSLContext) -> None:
        super().__init__(policy)
        self.verify = verify

    async def _send(
        self, signer: SessionSigner, method: str, url: str, body: bytes | None, *, fresh: bool
    ) -> tuple[HttpResult, dict[str, str]]:
        headers = signer.headers_for(url, method, body, fresh=fresh)
        headers.setdefault("Accept", "application/json, text/plain;q=0.9, */*;q=0.5")
        timeout = aiohttp.ClientTimeout(total=30, connect=10, sock_read=10)  # anp's values
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    ssl=self.verify,
                    allow_redirects=False,
                ) as response,
            ):
                content = await response.content.read(self.policy.max_response_bytes + 1)
                response_headers = dict(response.headers)
                status = response.status
        except aiohttp.ClientError as exc:
            raise ANPToolError("UNREACHABLE", f"cannot reach {url}: {exc!r}", url=url) from None
        result = HttpResult(
            url=url,
            status=status,
            content_type=response_headers.get("Content-Type", ""),
            body=content,
            location=response_headers.get("Location", ""),
        )
        return result, {k.lower(): v for k, v in response_headers.items()}


class NewConnectionHttpClient(ANPHttpClient):
    """The package's client with a connection per request (what-if, bench only)."""

    def _connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(ssl=self._ssl, force_close=True)


def http_client(kind: str, policy: URLPolicy, verify: ssl.SSLContext) -> ANPHttpClient:
    if kind == "anp":
        return AnpStyleHttpClient(policy, verify)
    if kind == "pooled":
        return ANPHttpClient(policy, ssl=verify)
    return NewConnectionHttpClient(policy, ssl=verify)


def mcp_stack(config: SessionConfig, verify: ssl.SSLContext, kind: str) -> ANPMiddleware:
    policy = URLPolicy(allow_private=True)
    toolkit = ANPToolkit(
        url_policy=policy,
        http_client=http_client(kind, policy, verify),
        document_cache_size=0,
    )

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host home")

    host = Starlette(routes=[Route("/", home)])
    return ANPMiddleware(
        host, authenticator=StaticConfigAuthenticator(config), toolkit=toolkit, url_policy=policy
    )


def tool_calls(agent_base: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "anp_fetchDoc": ("anp_fetchDoc", {"url": f"{agent_base}/ad.json"}),
        "anp_invokeOpenRPC": (
            "anp_invokeOpenRPC",
            {"endpoint": f"{agent_base}/rpc", "method": "echo", "params": {"message": "hi"}},
        ),
    }


# -- measurements -------------------------------------------------------------------------------


def batch(session: McpSession, tool: str, arguments: dict[str, Any], calls: int) -> Any:
    async def run() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            await session.call(tool, arguments)
        return (time.perf_counter() - start) / calls  # seconds per call (1 / throughput)

    return run


async def http_layer_only(
    config: SessionConfig, verify: ssl.SSLContext, agent: str, calls: int, rounds: int
) -> Result:
    """Diagnosis: the same three clients sending signed GETs directly, without MCP around them."""
    policy = URLPolicy(allow_private=True)
    signer = SessionSigner(load_credential(config))
    clients = {kind: http_client(kind, policy, verify) for kind in ("pooled", "anp", "fresh")}
    url = f"{agent}/ad.json"

    def side(client: ANPHttpClient) -> Any:
        async def run() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                result = await client.request(signer, "GET", url)
                assert result.status == 200
            return (time.perf_counter() - start) / calls

        return run

    try:
        costs = await rotate({kind: side(c) for kind, c in clients.items()}, rounds)
    finally:
        for client in clients.values():
            await client.aclose()
    per_call = {kind: median(values) * 1e3 for kind, values in costs.items()}
    ratios = [a / p for p, a in zip(costs["pooled"], costs["anp"], strict=True)]
    fresh = median([f / p for p, f in zip(costs["pooled"], costs["fresh"], strict=True)])
    text = (
        f"signed GET over HTTPS, no MCP: pooled {per_call['pooled']:.2f} ms, anp-style "
        f"{per_call['anp']:.2f} ms, new-conn {per_call['fresh']:.2f} ms per request "
        f"(new-conn ratio {fresh:.2f}); {spread(ratios)}"
    )
    log(f"  diagnosis, HTTP layer alone: {text}")
    return Result("5''. HTTP layer alone, HTTPS: pooled / anp-style", median(ratios), "info", text)


async def rotate(sides: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Run the sides in turn, rotating which goes first each round; per-round costs per side."""
    names = list(sides)
    for name in names:  # warm-up
        await sides[name]()
    costs: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            costs[name].append(await sides[name]())
    return costs


class Counter:
    """Counts calls of ``inner``; ``wrapper`` is a plain function, so it binds as a method."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.calls = 0

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return inner(*args, **kwargs)

        self.wrapper = wrapper


async def key_parsing(
    http: httpx.AsyncClient, mcp_url: str, agent: str, identity: Any, sessions: int, calls: int
) -> tuple[int, str]:
    """Count PEM parses and signatures while new sessions make tool calls."""
    pem_counter = Counter(serialization.load_pem_private_key)
    sign_counter = Counter(DidCredential.sign)
    serialization.load_pem_private_key = pem_counter.wrapper
    DidCredential.sign = sign_counter.wrapper  # type: ignore[method-assign]
    try:
        total = 0
        for _ in range(sessions):
            session = McpSession(http, mcp_url)
            await session.initialize()
            for i in range(calls):
                tool, arguments = tool_calls(agent)[
                    "anp_fetchDoc" if i % 2 == 0 else "anp_invokeOpenRPC"
                ]
                await session.call(tool, arguments)
                total += 1
        ours = (pem_counter.calls, sign_counter.calls)
        pem_counter.calls = 0
        signer = DIDWbaAuthHeader(
            did_document_path=str(identity.did_document_path),
            private_key_path=str(identity.private_key_path),
        )
        for _ in range(ours[1] or 10):
            signer.get_auth_header(f"{agent}/rpc", force_new=True, method="POST", body=b"{}")
        anp_parses = pem_counter.calls
    finally:
        serialization.load_pem_private_key = pem_counter.inner
        DidCredential.sign = sign_counter.inner  # type: ignore[method-assign]
    text = (
        f"{sessions} new sessions x {calls} tool calls = {total} calls: {ours[1]} DID signatures, "
        f"{ours[0]} PEM parses (the credential was already loaded when the stack first "
        f"authenticated it); anp's DIDWbaAuthHeader: {ours[1] or 10} signatures -> "
        f"{anp_parses} PEM parses"
    )
    log(f"  DID key: {text}")
    return ours[0], text


async def run(quick: bool) -> list[Result]:
    logging.getLogger("mcp").setLevel(logging.WARNING)
    logging.getLogger("example_app").setLevel(logging.WARNING)
    calls, rounds = (8, 5) if quick else (20, 15)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tls = self_signed_cert(tmp_path)
        verify = ssl.create_default_context(cafile=str(tls[0]))
        identity = create_demo_identity(tmp_path, "alice", port=9880)
        config = SessionConfig(
            principal="alice",
            did_document_path=identity.did_document_path,
            private_key_path=identity.private_key_path,
        )
        resolver = StaticDidResolver({identity.did: identity.did_document})
        kinds = ("pooled", "anp", "fresh")
        ports = {name: free_port() for name in ("http", "https", *kinds)}
        agents = {
            "http": f"http://127.0.0.1:{ports['http']}",
            "https": f"https://127.0.0.1:{ports['https']}",
        }
        async with AsyncExitStack() as stack:
            for scheme in ("http", "https"):
                agent = create_demo_agent(base_url=agents[scheme], did_resolver=resolver)
                await stack.enter_async_context(
                    serve(agent, ports[scheme], tls if scheme == "https" else None)
                )
            for name in kinds:
                middleware = mcp_stack(config, verify, name)
                await stack.enter_async_context(serve(middleware, ports[name]))
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            sessions = {}
            for name in kinds:
                sessions[name] = McpSession(http, f"http://127.0.0.1:{ports[name]}/mcp")
                await sessions[name].initialize()
            for scheme in ("https", "http"):
                for tool, (name, arguments) in tool_calls(agents[scheme]).items():
                    for kind in kinds:
                        answer = await sessions[kind].call(name, arguments)
                        assert answer["structuredContent"]["status"] == 200, answer
                    costs = await rotate(
                        {kind: batch(sessions[kind], name, arguments, calls) for kind in kinds},
                        rounds,
                    )
                    rates = {kind: 1 / median(values) for kind, values in costs.items()}
                    for baseline, label, target in (
                        ("anp", "anp-style (aiohttp session per call)", ">= 2"),
                        ("fresh", "new connection per call (same client)", "info"),
                    ):
                        ratios = [
                            b / p for p, b in zip(costs["pooled"], costs[baseline], strict=True)
                        ]
                        ratio = median(ratios)
                        log(
                            f"  {tool} via {scheme}: pooled {rates['pooled']:.0f} calls/s vs "
                            f"{label} {rates[baseline]:.0f} calls/s: ratio {ratio:.2f}; "
                            f"{spread(ratios)}"
                        )
                        short = "anp-style" if baseline == "anp" else "new-conn"
                        rows.append(
                            Result(
                                f"5. {tool}, {scheme.upper()} agent: pooled / {short}",
                                ratio,
                                target if scheme == "https" else "info",
                                f"{rates['pooled']:.0f} vs {rates[baseline]:.0f} calls/s; "
                                f"{spread(ratios)}",
                            )
                        )
            rows.append(await http_layer_only(config, verify, agents["https"], calls, rounds))
            parses, text = await key_parsing(
                http,
                f"http://127.0.0.1:{ports['pooled']}/mcp",
                agents["https"],
                identity,
                sessions=3 if quick else 10,
                calls=4 if quick else 10,
            )
            rows.append(
                Result("5'. DID key PEM parses during tool calls", parses, "info", text, unit="")
            )
    return rows


def main(args: argparse.Namespace) -> list[Result]:
    started = time.perf_counter()
    log("[5] ANP tool calls through the whole stack (uvicorn on loopback)")
    results = asyncio.run(run(args.quick))
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return results


if __name__ == "__main__":
    run_module(main, __doc__ or "")
