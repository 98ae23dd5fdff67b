"""DID documents served by the host app, at the path did:wba resolution fetches, and resolved
over HTTP by the demo agent (issue #13, item 6)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anp.authentication.did_wba as anp_did_wba
import httpx
import httpx2
import pytest
from anp.authentication import create_did_wba_document
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from example_app.app import create_app
from example_app.demo_agent import (
    LoopbackHttpDidResolver,
    create_demo_agent,
    create_demo_identity,
    did_wba_document_url,
    is_loopback_did,
)
from example_app.settings import parse_settings
from mcp2anp_middleware import (
    ANPMiddleware,
    CachingAuthenticator,
    SessionConfig,
    StaticKeyAuthenticator,
    URLPolicy,
)
from mcp2anp_middleware.anp_tools.dev_identity import dev_did_address, ensure_dev_identity
from mcp2anp_middleware.anp_tools.did_hosting import (
    WELL_KNOWN_PATH,
    DidDocumentApp,
    contains_private_key,
    did_wba_location,
)

from .servers import free_port, serve

pytestmark = pytest.mark.anyio


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


def new_document(port: int | None = 9880, segments: list[str] | None = None) -> dict[str, Any]:
    document, _ = create_did_wba_document(
        hostname="localhost", port=port, path_segments=segments if segments is not None else []
    )
    assert isinstance(document, dict)
    return document


# -- DID -> path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("did", "authority", "path", "url"),
    [
        (
            "did:wba:example.com",
            "example.com",
            "/.well-known/did.json",
            "https://example.com/.well-known/did.json",
        ),
        (
            "did:wba:localhost%3A9880",
            "localhost:9880",
            "/.well-known/did.json",
            "https://localhost:9880/.well-known/did.json",
        ),
        (
            "did:wba:example.com%3A8443:users:alice",
            "example.com:8443",
            "/users/alice/did.json",
            "https://example.com:8443/users/alice/did.json",
        ),
        (
            "did:wba:localhost%3a9880:users:dev:e1_abc",  # lower-case percent-encoding
            "localhost:9880",
            "/users/dev/e1_abc/did.json",
            "https://localhost:9880/users/dev/e1_abc/did.json",
        ),
        (
            "did:wba:example.com:user%20name:x",  # segments decoded for the ASGI path only
            "example.com",
            "/user name/x/did.json",
            "https://example.com/user%20name/x/did.json",
        ),
    ],
)
def test_did_maps_to_the_path_resolution_fetches(
    did: str, authority: str, path: str, url: str
) -> None:
    location = did_wba_location(did)
    assert (location.authority, location.path, location.url()) == (authority, path, url)
    assert location.url("http") == "http" + url.removeprefix("https")
    # The demo agent's own (independent) mapping agrees.
    assert did_wba_document_url(did, "https") == url


@pytest.mark.parametrize(
    "did",
    [
        "did:web:example.com",
        "did:wba:",
        "did:wba:example.com::alice",  # empty segment
        "did:wba:example.com:users:",
        "did:wba:example.com:a%2Fb",  # decodes to a slash
        "did:wba:example.com:..",
        "did:wba:example.com:users:alice#key-1",  # a DID URL
        "did:wba:user%40example.com",
    ],
)
def test_unusable_dids_are_refused(did: str) -> None:
    with pytest.raises(ValueError):
        did_wba_location(did)


@dataclass
class _AnpFetch:
    """Stands in for aiohttp under anp's resolver: records the URL, answers from an ASGI app."""

    app: ASGIApp
    urls: list[str] = field(default_factory=list)

    def session(self, *args: Any, **kwargs: Any) -> _AnpFetch:
        return self

    async def __aenter__(self) -> _AnpFetch:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def get(self, url: str, **kwargs: Any) -> _AnpResponse:
        self.urls.append(url)
        return _AnpResponse(self.app, url)


@dataclass
class _AnpResponse:
    app: ASGIApp
    url: str
    response: httpx.Response | None = None

    async def __aenter__(self) -> _AnpResponse:
        parts = urlsplit(self.url)
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{parts.netloc}") as c:
            self.response = await c.get(parts.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def raise_for_status(self) -> None:
        assert self.response is not None
        if self.response.status_code >= 400:
            raise aiohttp.ClientError(f"HTTP {self.response.status_code}")

    async def json(self) -> Any:
        assert self.response is not None
        # aiohttp's json() refuses any other content type, which would fail resolution.
        if self.response.headers["content-type"] != "application/json":
            raise aiohttp.ClientError("not application/json")
        return self.response.json()


@pytest.mark.parametrize("segments", [["users", "alice"], []])
async def test_anps_own_resolver_finds_what_is_served(
    segments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    document = new_document(segments=segments)
    app = DidDocumentApp([document])
    fetch = _AnpFetch(app)
    monkeypatch.setattr(anp_did_wba.aiohttp, "ClientSession", fetch.session)
    resolved = await anp_did_wba.resolve_did_wba_document(document["id"])
    assert resolved == document
    assert fetch.urls == [did_wba_location(document["id"]).url()]
    if not segments:
        assert fetch.urls == ["https://localhost:9880/.well-known/did.json"]


# -- the side app ---------------------------------------------------------------------------------


async def _get(app: ASGIApp, path: str, method: str = "GET", host: str = "localhost:9880") -> Any:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
        return await client.request(method, path)


async def test_side_app_serves_json_by_path_and_nothing_else() -> None:
    document = new_document(segments=["users", "alice"])
    app = DidDocumentApp([document])
    path = did_wba_location(document["id"]).path
    assert app.paths == {path} and app.dids == {document["id"]}

    got = await _get(app, path, host="127.0.0.1:1")  # any Host: served by path
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert got.json() == document
    head = await _get(app, path, "HEAD")
    assert head.status_code == 200 and head.content == b""
    post = await _get(app, path, "POST")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert (await _get(app, "/users/alice/other.json")).status_code == 404

    app.add(document)  # the same document again: harmless
    with pytest.raises(ValueError, match="another DID document"):
        app.add({**document, "authentication": []})


async def test_two_hosts_one_path_are_told_apart_by_host() -> None:
    first = {"id": "did:wba:a.example:users:alice"}
    second = {"id": "did:wba:b.example:users:alice"}
    app = DidDocumentApp([first, second])
    assert app.paths == {"/users/alice/did.json"}
    assert (await _get(app, "/users/alice/did.json", host="a.example")).json() == first
    assert (await _get(app, "/users/alice/did.json", host="B.example")).json() == second
    assert (await _get(app, "/users/alice/did.json", host="c.example")).status_code == 404


def test_documents_with_private_keys_are_refused() -> None:
    document = new_document(segments=["users", "alice"])
    assert not contains_private_key(document)
    method = document["verificationMethod"][0]
    leaks = [
        {**method, "privateKeyMultibase": "z3u2..."},
        {**method, "publicKeyJwk": {"kty": "OKP", "crv": "Ed25519", "x": "abc", "d": "secret"}},
        {**method, "notes": "-----BEGIN PRIVATE KEY-----\nMC4...\n-----END PRIVATE KEY-----"},
        {**method, "secretKey": "abc"},
    ]
    for leak in leaks:
        leaked = {**document, "verificationMethod": [leak]}
        assert contains_private_key(leaked), leak
        with pytest.raises(ValueError, match="private key"):
            DidDocumentApp([leaked])


# -- the development DID's address ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://127.0.0.1:9880", ("localhost", 9880)),
        ("http://[::1]:8000/", ("localhost", 8000)),
        ("http://localhost:8000", ("localhost", 8000)),
        ("https://Agents.Example.com", ("agents.example.com", None)),
        ("https://agents.example.com:443", ("agents.example.com", None)),
        ("https://agents.example.com:8443", ("agents.example.com", 8443)),
    ],
)
def test_public_url_gives_the_dev_did_address(url: str, address: tuple[str, int | None]) -> None:
    assert dev_did_address(url) == address


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1:8000", "http://example.com/app", "ftp://example.com", "example.com:80"],
)
def test_public_url_that_no_dev_did_can_name_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        dev_did_address(url)


def test_dev_identity_follows_the_address(tmp_path: Path) -> None:
    def did(config: SessionConfig) -> str:
        assert config.did_document_path is not None
        value: str = json.loads(config.did_document_path.read_text(encoding="utf-8"))["id"]
        return value

    first = ensure_dev_identity(tmp_path, hostname="localhost", port=8123)
    assert did(first).startswith("did:wba:localhost%3A8123:users:dev:e1_")
    made = did(first)
    again = ensure_dev_identity(tmp_path, hostname="localhost", port=8123)
    assert again == first and did(again) == made  # same address: reused
    unpinned = ensure_dev_identity(tmp_path)
    assert unpinned == first and did(unpinned) == made  # no address given: whatever is there

    moved = ensure_dev_identity(tmp_path, hostname="localhost", port=8124)
    assert did(moved).startswith("did:wba:localhost%3A8124:users:dev:e1_")  # replaced in place
    assert moved.did_document_path == first.did_document_path
    assert moved.private_key_path is not None
    assert moved.private_key_path.stat().st_mode & 0o777 == 0o600


# -- ANPMiddleware serves what it signs with -----------------------------------------------------


async def _host_home(request: Any) -> PlainTextResponse:
    return PlainTextResponse("host", status_code=404)


async def _host(scope: Scope, receive: Receive, send: Send) -> None:
    """The host app: answers every request itself (404 "host"), so a response tells who sent it."""
    if scope["type"] == "http":
        await PlainTextResponse("host", status_code=404)(scope, receive, send)


async def test_dev_mode_serves_the_dev_document_and_never_the_key(tmp_path: Path) -> None:
    middleware = ANPMiddleware(_host, data_dir=tmp_path, public_url="http://127.0.0.1:8123")
    document = json.loads((tmp_path / "dev" / "did.json").read_text(encoding="utf-8"))
    assert document["id"].startswith("did:wba:localhost%3A8123:users:dev:")
    location = did_wba_location(document["id"])
    assert middleware.did_app.dids == {document["id"]}

    served = await _get(middleware, location.path, host="localhost:8123")
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    assert served.json() == document
    pem = (tmp_path / "dev" / "key-1_private.pem").read_text(encoding="utf-8")
    key_body = "".join(pem.strip().splitlines()[1:-1])
    assert key_body not in served.text and "PRIVATE" not in served.text
    assert not contains_private_key(served.json())
    key_url = location.path.removesuffix("did.json") + "key-1_private.pem"
    for path in (key_url, "/dev/key-1_private.pem", "/key-1_private.pem", WELL_KNOWN_PATH):
        missed = await _get(middleware, path)
        assert missed.status_code == 404 and missed.text == "host", path  # the host's own 404


async def test_static_configs_are_served_but_a_leaking_document_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice = create_demo_identity(tmp_path, "alice", port=8123, path_segments=["users", "alice"])
    leaking = new_document(port=8123, segments=["users", "mallory"])
    leaking["verificationMethod"][0]["privateKeyMultibase"] = "z-not-for-publication"
    keys = StaticKeyAuthenticator(
        {
            "key-alice-0123456789": SessionConfig(
                principal="alice",
                did_document_path=alice.did_document_path,
                private_key_path=alice.private_key_path,
            ),
            "key-mallory-0123456789": SessionConfig(
                principal="mallory", did_document=json.dumps(leaking), private_key_pem="x"
            ),
        }
    )
    with caplog.at_level(logging.WARNING):
        middleware = ANPMiddleware(_host, authenticator=CachingAuthenticator(keys))
    assert middleware.did_app.dids == {alice.did}
    served = await _get(middleware, did_wba_location(alice.did).path)
    assert served.status_code == 200 and served.json() == alice.did_document
    refused = await _get(middleware, did_wba_location(leaking["id"]).path)
    assert refused.status_code == 404 and "z-not-for-publication" not in refused.text

    quiet = ANPMiddleware(_host, authenticator=keys, serve_did_documents=False)
    assert (await _get(quiet, did_wba_location(alice.did).path)).text == "host"


# -- the demo agent's resolver -------------------------------------------------------------------


async def test_resolver_refuses_non_loopback_before_connecting() -> None:
    contacted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        contacted.append(str(request.url))
        return httpx.Response(500)

    resolver = LoopbackHttpDidResolver(transport=httpx.MockTransport(handler))
    for did in (
        "did:wba:example.com:users:alice",
        "did:wba:10.0.0.1%3A80:users:alice",
        "did:wba:localhost.example.com%3A80:users:alice",
        "did:wba:127.0.0.1%40example.com:users:alice",
        "did:web:localhost",
    ):
        assert not is_loopback_did(did)
        assert await resolver(did) is None, did
    assert contacted == []


async def test_resolver_connects_to_the_checked_address_and_wants_json() -> None:
    document = {"id": "did:wba:localhost%3A9880:users:alice"}
    seen: list[tuple[str, str]] = []
    answers = [
        httpx.Response(200, json=document),
        httpx.Response(200, text=json.dumps(document)),  # text/plain: not a DID document
        httpx.Response(302, headers={"location": "http://10.0.0.1/"}),  # never followed
        httpx.Response(200, json={"id": "did:wba:localhost%3A9880:users:bob"}),  # another id
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"]))
        return answers[len(seen) - 1]

    resolver = LoopbackHttpDidResolver(transport=httpx.MockTransport(handler))
    assert is_loopback_did(document["id"])
    assert await resolver(document["id"]) == document
    for _ in answers[1:]:
        assert await resolver(document["id"]) is None
    assert {host for _, host in seen} == {"localhost:9880"}
    assert all(urlsplit(url).hostname in ("127.0.0.1", "::1") for url, _ in seen)
    assert {urlsplit(url).path for url, _ in seen} == {"/users/alice/did.json"}


# -- acceptance: served by the host app, resolved over HTTP by the demo agent ---------------------


class RequestLog:
    """Outermost ASGI layer recording (method, path, Host, status) of every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.entries: list[tuple[str, str, str, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.entries.append((scope["method"], scope["path"], host, message["status"]))
            await send(message)

        await self.app(scope, receive, recording_send)


@asynccontextmanager
async def mcp_client(base_url: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers=headers or {}) as http:
        transport = streamable_http_client(f"{base_url}/mcp", http_client=http)
        async with Client(transport, mode="legacy") as client:
            yield client


async def _whoami(client: Client, base_url: str) -> CallToolResult:
    return await client.call_tool(
        "anp_invokeOpenRPC", {"endpoint": f"{base_url}/agent/rpc", "method": "whoami"}
    )


def _dev_stack(tmp_path: Path, port: int, **options: Any) -> RequestLog:
    base_url = f"http://127.0.0.1:{port}"
    agent = create_demo_agent(base_url=f"{base_url}/agent", did_resolver=LoopbackHttpDidResolver())
    host = Starlette(routes=[Route("/", _host_home), Mount("/agent", app=agent)])
    middleware = ANPMiddleware(
        host,
        data_dir=tmp_path,
        public_url=base_url,
        url_policy=URLPolicy(private_origins=(f"{base_url}/agent/",)),
        **options,
    )
    return RequestLog(middleware)


async def test_signed_call_verified_with_a_did_resolved_from_the_host_app(tmp_path: Path) -> None:
    port = free_port()
    app = _dev_stack(tmp_path, port)
    dev_did = json.loads((tmp_path / "dev" / "did.json").read_text(encoding="utf-8"))["id"]
    assert dev_did.startswith(f"did:wba:localhost%3A{port}:users:dev:e1_")
    document_path = did_wba_location(dev_did).path

    async with serve(app, port=port) as base_url, mcp_client(base_url) as client:
        who = ok(await _whoami(client, base_url))
        assert who["result"] == {"did": dev_did, "auth_scheme": "http_signatures"}

    # The agent verified the signature with the document it fetched from the host app, over
    # HTTP, at the address and path the DID names (not from a table or the data directory).
    fetched = [entry for entry in app.entries if entry[1] == document_path]
    assert fetched == [("GET", document_path, f"localhost:{port}", 200)]
    rpc = [entry for entry in app.entries if entry[1] == "/agent/rpc"]
    assert rpc and rpc[0][3] == 200


async def test_without_the_served_document_the_agent_refuses_the_call(tmp_path: Path) -> None:
    port = free_port()
    app = _dev_stack(tmp_path, port, serve_did_documents=False)
    dev_did = json.loads((tmp_path / "dev" / "did.json").read_text(encoding="utf-8"))["id"]
    async with serve(app, port=port) as base_url, mcp_client(base_url) as client:
        refused = await _whoami(client, base_url)
    assert refused.is_error
    assert ("GET", did_wba_location(dev_did).path, f"localhost:{port}", 404) in app.entries
    assert ("POST", "/agent/rpc", f"127.0.0.1:{port}", 401) in app.entries


async def test_launcher_resolves_dev_and_static_dids_over_http(tmp_path: Path) -> None:
    port = free_port()
    flags = ["--port", str(port), "--data-dir", str(tmp_path / "data")]

    # Development mode: the DID is made for the launcher's address and served by it.
    stale = ensure_dev_identity(tmp_path / "data", hostname="localhost", port=free_port())
    app = RequestLog(create_app(parse_settings(flags, env={})))
    assert stale.did_document_path is not None
    dev_did = json.loads(stale.did_document_path.read_text(encoding="utf-8"))["id"]
    assert dev_did.startswith(f"did:wba:localhost%3A{port}:")  # the stale one was replaced
    async with serve(app, port=port) as base_url, mcp_client(base_url) as client:
        assert ok(await _whoami(client, base_url))["result"]["did"] == dev_did
    assert ("GET", did_wba_location(dev_did).path, f"localhost:{port}", 200) in app.entries

    # Static keys: a keys file's loopback DID is served by the launcher and fetched from it.
    alice = create_demo_identity(tmp_path, "alice", port=port, path_segments=["users", "alice"])
    keys_file = tmp_path / "keys.json"
    entry = {
        "api_key": "key-alice-0123456789",
        "principal": "alice",
        "did_document_path": str(alice.did_document_path),
        "private_key_path": str(alice.private_key_path),
    }
    keys_file.write_text(json.dumps({"keys": [entry]}), encoding="utf-8")
    static = [*flags, "--auth-mode", "static", "--api-keys-file", str(keys_file)]
    app = RequestLog(create_app(parse_settings(static, env={})))
    headers = {"X-API-Key": "key-alice-0123456789"}
    async with serve(app, port=port) as base_url, mcp_client(base_url, headers) as client:
        assert ok(await _whoami(client, base_url))["result"]["did"] == alice.did
    assert ("GET", did_wba_location(alice.did).path, f"localhost:{port}", 200) in app.entries


async def test_extra_documents_are_served_unless_their_path_is_the_middlewares(
    tmp_path: Path,
) -> None:
    extra = new_document(port=8123, segments=["agents", "helper"])
    shadowing = {"id": "did:wba:localhost%3A8123:mcp:x"}  # would sit under the MCP prefix
    keys = StaticKeyAuthenticator({})
    middleware = ANPMiddleware(
        _host,
        authenticator=keys,
        did_documents=[extra, shadowing],
        public_url="http://10.0.0.5:8123",  # fine beside an authenticator: only a diagnostic
    )
    assert middleware.did_app.dids == {extra["id"]}
    assert (await _get(middleware, did_wba_location(extra["id"]).path)).json() == extra
    with pytest.raises(ValueError, match="IP address"):  # development mode must name it
        ANPMiddleware(_host, data_dir=tmp_path, public_url="http://10.0.0.5:8123")
