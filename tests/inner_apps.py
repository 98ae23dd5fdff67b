"""Small real ASGI apps the middleware is tested around."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from mcp2anp_middleware.sessions.middleware import SESSION_SCOPE_KEY


class RecordingMCPApp:
    """Answers like a JSON MCP endpoint and records which session each request saw.

    ``initialize`` with ``params.reject`` is answered 400 (a rejected handshake). A request whose
    JSON-RPC method is ``block`` waits until :attr:`release` is set (an in-flight request). GET
    opens a streaming response that stays open until :attr:`release` is set (an SSE stream).
    Every response also carries its own ``Mcp-Session-Id`` header, as a stateful SDK would, to
    prove the middleware replaces it.
    """

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        state = scope.get("state", {}).get(SESSION_SCOPE_KEY)
        self.seen.append(state)
        headers = [(b"content-type", b"application/json"), (b"mcp-session-id", b"inner-app-id")]
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b": open\n\n", "more_body": True})
            self.started.set()
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = b""
        while True:
            message: Message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        if request.get("method") == "block":
            self.started.set()
            await self.release.wait()
        status = 400 if (request.get("params") or {}).get("reject") else 200
        payload = {
            "jsonrpc": "2.0",
            "id": request.get("id"),
            "result": {"session": getattr(state, "session_id", None)},
        }
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class HostApp:
    """A host app outside the prefix that also speaks lifespan and records what it saw."""

    def __init__(self, *, lifespan: str = "supported") -> None:
        self.lifespan_mode = lifespan
        self.lifespan_events: list[str] = []
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if self.lifespan_mode == "raises":
                raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
            while True:
                message = await receive()
                self.lifespan_events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.scopes.append(scope)
        body = b"host"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
