"""The pure-ASGI middleware that owns MCP session lifecycle under a path prefix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .authentication import (
    AuthenticationError,
    Authenticator,
    StaticConfigAuthenticator,
    credentials_from_headers,
)
from .background import BackgroundRunner, Service, Sleep
from .clock import Clock, system_clock
from .jsonrpc_errors import INVALID_REQUEST, PARSE_ERROR, UNAUTHORIZED, send_jsonrpc_error
from .lifespan import run_lifespan
from .protocol import is_sessionless_version
from .session_ids import is_well_formed_session_id, short_id
from .session_registry import SessionRegistry
from .session_state import SessionState

logger = structlog.get_logger("mcp2anp_middleware.middleware")

SESSION_SCOPE_KEY = "mcp_session"
"""Key of the :class:`SessionState` in ``scope["state"]`` (``request.state.mcp_session``)."""

SESSION_HEADER = "mcp-session-id"
_SESSION_HEADER_B = SESSION_HEADER.encode()
_PROTOCOL_HEADER_B = b"mcp-protocol-version"
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class MCPSessionMiddleware:
    """Resolves ``Mcp-Session-Id`` to a :class:`SessionState` for requests under ``path_prefix``.

    Requests under the prefix go to ``mcp_app`` when given (the MCP endpoint this middleware
    hosts), otherwise to the wrapped ``app``; everything else goes to ``app`` untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        mcp_app: ASGIApp | None = None,
        path_prefix: str = "/mcp",
        session_timeout: float = 1800.0,
        cleanup_interval: float = 300.0,
        max_session_age: float | None = None,
        authenticator: Authenticator | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        clock: Clock = system_clock,
        sleep: Sleep = asyncio.sleep,
        services: Sequence[Service] = (),
        registry: SessionRegistry | None = None,
    ) -> None:
        if not path_prefix.startswith("/") or (path_prefix != "/" and path_prefix.endswith("/")):
            raise ValueError("path_prefix must start with '/' and not end with '/'")
        self.app = app
        self.mcp_app = mcp_app if mcp_app is not None else app
        self.path_prefix = path_prefix
        self._prefix_slash = path_prefix.rstrip("/") + "/"
        self.max_body_size = max_body_size
        self.authenticator: Authenticator = authenticator or StaticConfigAuthenticator()
        self.registry = registry or SessionRegistry(
            session_timeout=session_timeout, max_session_age=max_session_age, clock=clock
        )
        self.background = BackgroundRunner(
            self.registry, cleanup_interval=cleanup_interval, services=services, sleep=sleep
        )

    # -- ASGI entry point -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            path: str = scope["path"]
            if path == self.path_prefix or path.startswith(self._prefix_slash):
                await self._handle_mcp(scope, receive, send)
                return
        elif scope_type == "lifespan":
            await run_lifespan(
                self.app, scope, receive, send, startup=self.startup, shutdown=self.shutdown
            )
            return
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Start the cleanup loop and services (called from lifespan, or lazily)."""
        await self.background.start()

    async def shutdown(self) -> None:
        await self.background.stop()

    # -- MCP requests ---------------------------------------------------------------------------

    async def _handle_mcp(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.background.running:
            await self.startup()  # servers without lifespan events (httpx.ASGITransport, ...)
        method: str = scope["method"]
        if method == "OPTIONS":  # CORS preflight carries no credentials or session
            await self.mcp_app(scope, receive, send)
            return

        session_ids: list[bytes] = []
        protocol_version: str | None = None
        for name, value in scope["headers"]:
            if name == _SESSION_HEADER_B:
                session_ids.append(value)
            elif name == _PROTOCOL_HEADER_B:
                protocol_version = value.decode("latin-1")

        body: bytes | None = None
        if method == "POST":
            try:
                body = await _read_body(scope, receive, self.max_body_size)
            except _BodyTooLarge:
                await send_jsonrpc_error(
                    send,
                    413,
                    INVALID_REQUEST,
                    f"Request body exceeds {self.max_body_size} bytes",
                )
                return
            except _ClientGone:
                return
            receive = _replay(body, receive)

        try:
            config = await self.authenticator(credentials_from_headers(scope["headers"]))
        except AuthenticationError as exc:
            await send_jsonrpc_error(
                send,
                exc.status,
                UNAUTHORIZED,
                str(exc) or "Authentication required",
                request_id=_request_id(body),
                headers=[(b"www-authenticate", b'Bearer realm="mcp"')] if exc.status == 401 else [],
            )
            return

        if is_sessionless_version(protocol_version):
            state = self.registry.implicit_session(config)
            if session_ids:
                scope = dict(scope)
                scope["headers"] = [h for h in scope["headers"] if h[0] != _SESSION_HEADER_B]
            await self._serve(state, scope, receive, send, new=False)
            return

        if len(session_ids) > 1:
            await self._reject(send, 400, "Multiple Mcp-Session-Id headers", body)
            return
        if session_ids:
            raw = session_ids[0].decode("latin-1")
            if not is_well_formed_session_id(raw):
                await self._reject(send, 400, "Malformed Mcp-Session-Id header", body)
                return
            found = self.registry.get(raw)
            if found is None or found.principal != config.principal:
                await self._reject(send, 404, "Session not found", body)
                return
            if method == "DELETE":
                self.registry.remove(raw, reason="deleted")
                logger.info("Session closed by client DELETE request", session_id=short_id(raw))
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            logger.debug("Using existing session", session_id=short_id(raw))
            await self._serve(found, scope, receive, send, new=False)
            return

        if body is None:
            await self._reject(send, 400, "Missing Mcp-Session-Id header", None)
            return
        try:
            message = json.loads(body)
        except ValueError:
            await send_jsonrpc_error(send, 400, PARSE_ERROR, "Parse error: body is not JSON")
            return
        if not (isinstance(message, dict) and message.get("method") == "initialize"):
            await self._reject(send, 400, "Missing Mcp-Session-Id header", body)
            return
        await self._serve(self.registry.new_session(config), scope, receive, send, new=True)

    async def _serve(
        self, state: SessionState, scope: Scope, receive: Receive, send: Send, *, new: bool
    ) -> None:
        """Run the MCP app with ``state`` in scope; a new session is kept only on a 2xx answer."""
        scope = dict(scope)
        scope["state"] = {**scope.get("state", {}), SESSION_SCOPE_KEY: state}
        registry = self.registry

        async def send_with_session(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                del headers[SESSION_HEADER]  # this middleware is the only source of session ids
                if new and 200 <= message["status"] < 300:
                    registry.register(state)
                    headers[SESSION_HEADER] = state.session_id
                    _expose_session_header(headers)
            await send(message)

        registry.acquire(state)
        try:
            await self.mcp_app(scope, receive, send_with_session)
        finally:
            registry.release(state)

    async def _reject(self, send: Send, status: int, message: str, body: bytes | None) -> None:
        await send_jsonrpc_error(
            send, status, INVALID_REQUEST, message, request_id=_request_id(body)
        )


def _expose_session_header(headers: MutableHeaders) -> None:
    existing = headers.get("access-control-expose-headers")
    if existing is None:
        headers["Access-Control-Expose-Headers"] = "Mcp-Session-Id"
    elif "mcp-session-id" not in existing.lower():
        headers["Access-Control-Expose-Headers"] = existing + ", Mcp-Session-Id"


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise _BodyTooLarge
            except ValueError:
                pass
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _request_id(body: bytes | None) -> Any:
    """The JSON-RPC id of the request, echoed in error bodies when it can be read."""
    if not body:
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict):
        request_id = message.get("id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            return request_id
    return None
