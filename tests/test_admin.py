"""The session admin API and the registry's management calls, with the memory store.

(The same across two processes on Redis: ``test_two_processes.py``.)"""

from __future__ import annotations

import httpx
import pytest
from starlette.types import Message

from mcp2anp_middleware import MCPSessionMiddleware, SessionConfig
from mcp2anp_middleware.authentication.base import AuthenticationError, Credentials
from mcp2anp_middleware.sessions.clock import ManualClock

from .inner_apps import HostApp, RecordingMCPApp
from .messages import BARE_INITIALIZE as INIT
from .messages import PING

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
URL = "/mcp-admin/sessions"


async def by_key(credentials: Credentials) -> SessionConfig:
    if credentials.api_key not in ("alice", "bob"):
        raise AuthenticationError("Unknown API key")
    return SessionConfig(principal=credentials.api_key)


def build(**options: object) -> MCPSessionMiddleware:
    return MCPSessionMiddleware(
        HostApp(),
        mcp_app=RecordingMCPApp(),
        authenticator=by_key,
        clock=ManualClock(),
        admin_token=TOKEN,
        **options,  # type: ignore[arg-type]
    )


async def open_session(client: httpx.AsyncClient, key: str) -> str:
    response = await client.post("/mcp", json=INIT, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return response.headers["mcp-session-id"]


async def use(client: httpx.AsyncClient, key: str, session_id: str) -> int:
    headers = {"X-API-Key": key, "Mcp-Session-Id": session_id}
    return (await client.post("/mcp", json=PING, headers=headers)).status_code


def client_for(app: MCPSessionMiddleware) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_list_and_revoke_over_http() -> None:
    middleware = build()
    async with client_for(middleware) as client:
        alices = [await open_session(client, "alice") for _ in range(3)]
        bobs = await open_session(client, "bob")

        listed = (await client.get(URL, params={"principal": "alice"}, headers=ADMIN)).json()
        assert [s["id"] for s in listed["sessions"]] == [a[:8] + "…" for a in alices]
        assert {s["principal"] for s in listed["sessions"]} == {"alice"}
        everyone = (await client.get(URL, headers=ADMIN)).json()["sessions"]
        assert len(everyone) == 4 and bobs not in str(everyone)

        one = await client.delete(
            URL, params={"principal": "alice", "id": alices[0][:8] + "…"}, headers=ADMIN
        )
        assert one.json() == {"revoked": 1}
        assert await use(client, "alice", alices[0]) == 404
        assert await use(client, "alice", alices[1]) == 200

        rest = await client.delete(URL, params={"principal": "alice"}, headers=ADMIN)
        assert rest.json() == {"revoked": 2}
        assert [await use(client, "alice", a) for a in alices] == [404, 404, 404]
        assert await use(client, "bob", bobs) == 200
        assert middleware.registry.stats.removed["revoked"] == 3
    await middleware.shutdown()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", URL, {}, 401),
        ("GET", URL, {"Authorization": "Bearer wrong"}, 401),
        ("DELETE", URL, {"Authorization": f"Bearer {TOKEN}x"}, 401),
        ("DELETE", URL, ADMIN, 400),  # revoking needs a principal
        ("POST", URL, ADMIN, 405),
    ],
)
async def test_admin_refusals(method: str, path: str, headers: dict[str, str], status: int) -> None:
    middleware = build()
    async with client_for(middleware) as client:
        session_id = await open_session(client, "alice")
        response = await client.request(method, path, headers=headers)
        assert response.status_code == status
        assert response.json()["error"]["message"]
        assert await use(client, "alice", session_id) == 200  # nothing was revoked
    await middleware.shutdown()


async def test_admin_is_off_without_a_token() -> None:
    middleware = MCPSessionMiddleware(HostApp(), mcp_app=RecordingMCPApp(), clock=ManualClock())
    async with client_for(middleware) as client:
        response = await client.get(URL, headers=ADMIN)
    assert response.content == b"host"  # the host app's own answer: no admin route


@pytest.mark.parametrize("query", ["principal=alice&id=", "principal=", "principal=alice&id"])
async def test_an_empty_value_never_widens_an_admin_request(query: str) -> None:
    """``id=`` must not revoke all of a principal's sessions, ``principal=`` not list everyone's."""
    middleware = build()
    async with client_for(middleware) as client:
        session_id = await open_session(client, "alice")
        for method in ("GET", "DELETE"):
            response = await client.request(method, f"{URL}?{query}", headers=ADMIN)
            assert response.status_code == 400, response.text
        assert await use(client, "alice", session_id) == 200
    await middleware.shutdown()


async def test_an_undecodable_query_is_not_a_500() -> None:
    """A raw byte that is not UTF-8 in the query string (servers pass it through as is)."""
    middleware = build()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": URL,
        "query_string": b"principal=\xff\xfe",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
    }
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 200
    await middleware.shutdown()
