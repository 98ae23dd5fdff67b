"""The pure-ASGI middleware that owns MCP session lifecycle under a path prefix."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
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
from .jsonrpc_errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    UNAUTHORIZED,
    send_jsonrpc_error,
)
from .lifespan import run_lifespan
from .origin_check import OriginPolicy
from .protocol import is_sessionless_version
from .request_body import BodyTooLarge, ClientGone, jsonrpc_id, parse_json, read_body, replay
from .session_ids import is_well_formed_session_id, short_id
from .session_registry import SessionRegistry, ShuttingDown
from .session_state import SessionConfig, SessionState
from .state_file import load_state_file, save_state_file
from .stores.base import CapExceeded, SessionStore, StoreUnavailable

logger = structlog.get_logger("mcp2anp_middleware.middleware")

SESSION_SCOPE_KEY = "mcp_session"
"""Key of the :class:`SessionState` in ``scope["state"]`` (``request.state.mcp_session``)."""

SESSION_HEADER = "mcp-session-id"
_SESSION_HEADER_B = SESSION_HEADER.encode()
_PROTOCOL_HEADER_B = b"mcp-protocol-version"
DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024
_MAX_HELD_INITIALIZE = 1024 * 1024


class _Refusal(Exception):
    """A request answered with a JSON-RPC error instead of reaching the MCP app."""

    def __init__(self, status: int, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason


class MCPSessionMiddleware:
    """Resolves ``Mcp-Session-Id`` to a :class:`SessionState` for requests under ``path_prefix``.

    Requests under the prefix go to ``mcp_app`` when given (the MCP endpoint this middleware
    hosts), otherwise to the wrapped ``app``; everything else goes to ``app`` untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        mcp_app: ASGIApp | None = None,
        path_prefix: str = "/mcp",
        session_timeout: float = 1800.0,
        cleanup_interval: float = 300.0,
        max_session_age: float | None = None,
        authenticator: Authenticator | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        store: SessionStore | None = None,
        touch_interval: float | None = None,
        per_principal_cap: int | None = None,
        global_cap: int | None = None,
        cap_policy: Literal["reject", "evict_oldest"] = "reject",
        allowed_origins: Sequence[str] | None = None,
        stats_path: str | None = None,
        stats_token: str | None = None,
        shutdown_grace: float = 10.0,
        state_file: Path | str | None = None,
        clock: Clock = system_clock,
        sleep: Sleep = asyncio.sleep,
        services: Sequence[Service] = (),
        registry: SessionRegistry | None = None,
    ) -> None:
        if not path_prefix.startswith("/") or (path_prefix != "/" and path_prefix.endswith("/")):
            raise ValueError("path_prefix must start with '/' and not end with '/'")
        if cap_policy not in ("reject", "evict_oldest"):
            raise ValueError("cap_policy must be 'reject' or 'evict_oldest'")
        self.app = app
        self.mcp_app = mcp_app if mcp_app is not None else app
        self.path_prefix = path_prefix
        self._prefix_slash = path_prefix.rstrip("/") + "/"
        self.max_body_size = max_body_size
        self.authenticator: Authenticator = (
            authenticator if authenticator is not None else StaticConfigAuthenticator()
        )
        self.registry = (
            registry
            if registry is not None
            else SessionRegistry(
                store=store,
                session_timeout=session_timeout,
                max_session_age=max_session_age,
                clock=clock,
                touch_interval=touch_interval,
                per_principal_cap=per_principal_cap,
                global_cap=global_cap,
                evict_oldest=cap_policy == "evict_oldest",
            )
        )
        self.background = BackgroundRunner(
            self.registry, cleanup_interval=cleanup_interval, services=services, sleep=sleep
        )
        self.origins = OriginPolicy(allowed_origins)
        self.stats_path = stats_path
        self.stats_token = stats_token
        self.shutdown_grace = shutdown_grace
        self.state_file = Path(state_file) if state_file is not None else None
        self.started_at = time.time()
        self._stopped = False
        self._state_loaded = False

    # -- ASGI entry point -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The common case, a host request outside the prefix, costs two lookups and one compare.
        scope_type = scope["type"]
        if scope_type == "http":
            path: str = scope["path"]
            if path.startswith(self.path_prefix) and (
                path == self.path_prefix or path.startswith(self._prefix_slash)
            ):
                await self._handle_mcp(scope, receive, send)
                return
            if path == self.stats_path:
                await self._handle_stats(scope, send)
                return
        elif scope_type == "lifespan":
            await run_lifespan(
                self.app, scope, receive, send, startup=self.startup, shutdown=self.shutdown
            )
            return
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Restore saved sessions, start the cleanup loop and services (lifespan, or lazily)."""
        if self.state_file is not None and not self._state_loaded:
            self._state_loaded = True
            restored = await load_state_file(self.registry, self.state_file)
            if restored:
                logger.info("Sessions restored from state file", count=restored)
        self._stopped = False
        self.registry.accepting = True
        await self.background.start()

    async def shutdown(self) -> None:
        """Stop taking new sessions, let in-flight requests finish (bounded), then stop."""
        registry = self.registry
        registry.accepting = False
        self._stopped = True
        if not await registry.wait_idle(self.shutdown_grace):
            logger.warning("Shutting down with requests still in flight", count=registry.in_flight)
        await self.background.stop()
        if self.state_file is not None:
            saved = await save_state_file(registry, self.state_file)
            logger.info("Sessions saved to state file", count=saved)
        await registry.close_local()
        try:
            await registry.store.aclose()
        except Exception:  # pragma: no cover - closing a broken connection
            logger.warning("Session store did not close cleanly")

    # -- MCP requests ---------------------------------------------------------------------------

    async def _handle_mcp(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.background.ready:
            if self._stopped:
                await send_jsonrpc_error(
                    send, 503, INTERNAL_ERROR, "Server is shutting down; retry on another instance"
                )
                return
            try:
                await self.startup()  # servers without lifespan events (httpx.ASGITransport...)
            except Exception:
                logger.exception("Middleware startup failed")
                await send_jsonrpc_error(
                    send, 503, INTERNAL_ERROR, "Server is not ready; retry shortly"
                )
                return
        method: str = scope["method"]
        session_ids: list[bytes] = []
        versions: list[str] = []
        origin: str | None = None
        header_names_ok = True
        for name, value in scope["headers"]:
            if name == _SESSION_HEADER_B:
                session_ids.append(value)
            elif name == _PROTOCOL_HEADER_B:
                versions.append(value.decode("latin-1"))
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif not name.isascii():
                header_names_ok = False
        header_problem = None
        if not header_names_ok:
            header_problem = "Header names must be ASCII"
        elif len(versions) > 1:
            header_problem = "Multiple MCP-Protocol-Version headers"
        protocol_version = versions[0] if versions else None

        if not self.origins.allows(origin):
            self.registry.stats.rejected["origin"] += 1
            await send_jsonrpc_error(send, 403, INVALID_REQUEST, "Forbidden: Origin not allowed")
            return
        if method == "OPTIONS":  # CORS preflight carries no credentials or session
            await self.mcp_app(scope, receive, send)
            return

        body: bytes | None = None
        if method == "POST":
            try:
                body = await read_body(scope, receive, self.max_body_size)
            except BodyTooLarge:
                self.registry.stats.rejected["too_large"] += 1
                message = f"Request body exceeds {self.max_body_size} bytes"
                await send_jsonrpc_error(send, 413, INVALID_REQUEST, message)
                return
            except ClientGone:
                return
            receive = replay(body, receive)

        try:
            if header_problem is not None:
                raise _Refusal(400, INVALID_REQUEST, header_problem, "malformed")
            await self._route(scope, receive, send, method, session_ids, protocol_version, body)
        except _Refusal as refusal:
            self.registry.stats.rejected[refusal.reason] += 1
            headers: list[tuple[bytes, bytes]] = []
            if refusal.status == 401:
                headers.append((b"www-authenticate", b'Bearer realm="mcp"'))
            elif refusal.status in (429, 503):
                headers.append((b"retry-after", b"5"))
            await send_jsonrpc_error(
                send,
                refusal.status,
                refusal.code,
                refusal.message,
                request_id=jsonrpc_id(parse_json(body)),
                headers=headers,
            )

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        session_ids: list[bytes],
        protocol_version: str | None,
        body: bytes | None,
    ) -> None:
        config = await self._authenticate(scope)
        registry = self.registry

        if is_sessionless_version(protocol_version):
            try:
                state = await _store_call(registry.implicit_session(config))
            except (CapExceeded, ShuttingDown) as exc:
                raise _creation_refusal(exc) from None
            if session_ids:  # the spec says to ignore it in this era
                scope = dict(scope)
                scope["headers"] = [h for h in scope["headers"] if h[0] != _SESSION_HEADER_B]
            await self._serve(state, scope, receive, send, new=False)
            return

        if len(session_ids) > 1:
            raise _Refusal(400, INVALID_REQUEST, "Multiple Mcp-Session-Id headers", "malformed")
        if session_ids:
            raw = session_ids[0].decode("latin-1")
            if not is_well_formed_session_id(raw):
                raise _Refusal(400, INVALID_REQUEST, "Malformed Mcp-Session-Id header", "malformed")
            found = await _store_call(registry.get(raw, config))
            if found is None:
                raise _Refusal(404, INVALID_REQUEST, "Session not found", "unknown_session")
            if method == "DELETE":
                await _store_call(registry.remove(raw, reason="deleted"))
                logger.info("Session closed by client DELETE request", session_id=short_id(raw))
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            logger.debug("Using existing session", session_id=short_id(raw))
            await self._serve(found, scope, receive, send, new=False)
            return

        if body is None:
            raise _Refusal(400, INVALID_REQUEST, "Missing Mcp-Session-Id header", "missing_session")
        message = parse_json(body)
        if message is None:
            raise _Refusal(400, PARSE_ERROR, "Parse error: body is not JSON", "malformed")
        if not _is_initialize_request(message):
            raise _Refusal(400, INVALID_REQUEST, "Missing Mcp-Session-Id header", "missing_session")
        state = registry.new_session(config)
        try:
            await _store_call(registry.register(state))
        except (CapExceeded, ShuttingDown) as exc:
            raise _creation_refusal(exc) from None
        await self._serve(state, scope, receive, send, new=True)

    async def _authenticate(self, scope: Scope) -> SessionConfig:
        try:
            return await self.authenticator(credentials_from_headers(scope["headers"]))
        except AuthenticationError as exc:
            reason = "unauthorized" if exc.status == 401 else "auth_unavailable"
            raise _Refusal(
                exc.status, UNAUTHORIZED, str(exc) or "Authentication required", reason
            ) from None
        except Exception:
            logger.exception("Authenticator failed")
            message = "Credential check unavailable; retry shortly"
            raise _Refusal(503, UNAUTHORIZED, message, "auth_unavailable") from None

    async def _serve(
        self, state: SessionState, scope: Scope, receive: Receive, send: Send, *, new: bool
    ) -> None:
        """Run the MCP app with ``state`` in scope.

        A new session is kept only when the app answers its ``initialize`` with a JSON-RPC
        result: that answer (small) is held back until complete, then sent with the new id.
        """
        scope = dict(scope)
        scope["state"] = {**scope.get("state", {}), SESSION_SCOPE_KEY: state}
        registry = self.registry
        committed = False
        held_start: Message | None = None
        held_body: list[bytes] = []
        held_size = 0

        async def send_with_session(message: Message) -> None:
            nonlocal committed, held_start, held_size
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                del headers[SESSION_HEADER]  # this middleware is the only source of session ids
                if new:
                    held_start = message
                    return
            elif held_start is not None and message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                held_body.append(chunk)
                held_size += len(chunk)
                more = message.get("more_body", False)
                if more and held_size <= _MAX_HELD_INITIALIZE:
                    return
                start, held_start = held_start, None
                body = b"".join(held_body)
                if not more and _initialize_succeeded(start, body):
                    committed = True
                    registry.commit(state)
                    headers = MutableHeaders(scope=start)
                    headers[SESSION_HEADER] = state.session_id
                    _expose_session_header(headers)
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": more})
                return
            await send(message)

        try:
            await registry.acquire(state)
        except StoreUnavailable:
            if new:
                registry.abandon(state)
                with contextlib.suppress(StoreUnavailable):
                    await registry.store.delete(state.session_id)
            raise _unavailable() from None
        try:
            await self.mcp_app(scope, receive, send_with_session)
        finally:
            abandoned = new and not committed
            if abandoned:
                registry.abandon(state)  # no await: bookkeeping survives cancellation
            try:
                await registry.release(state)
                if abandoned:
                    with anyio.CancelScope(shield=True):
                        await registry.store.delete(state.session_id)
            except StoreUnavailable:
                logger.warning("Session store unavailable while ending a request")

    # -- statistics -----------------------------------------------------------------------------

    async def _handle_stats(self, scope: Scope, send: Send) -> None:
        if self.stats_token is not None:
            supplied = credentials_from_headers(scope["headers"]).bearer_token or ""
            if not hmac.compare_digest(supplied.encode(), self.stats_token.encode()):
                await send_jsonrpc_error(send, 401, UNAUTHORIZED, "Statistics need a valid token")
                return
        payload = await self.statistics()
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def statistics(self) -> dict[str, Any]:
        """Counters and gauges for monitoring (also served at ``stats_path`` when enabled)."""
        registry = self.registry
        now = registry.clock()
        try:
            active: int | None = await registry.store.count(now=now)
            healthy = await registry.store.ping()
        except Exception:
            active, healthy = None, False
        return {
            "active_sessions": active,
            "local_sessions": len(registry),
            "in_flight_requests": registry.in_flight,
            "accepting_sessions": registry.accepting,
            "store": {"type": type(registry.store).__name__, "healthy": healthy},
            "uptime_seconds": round(time.time() - self.started_at, 3),
            **registry.stats.as_dict(),
        }


def _initialize_succeeded(start: Message, body: bytes) -> bool:
    """True when an ``initialize`` answer is 2xx and carries a JSON-RPC result (JSON or SSE)."""
    if not 200 <= start["status"] < 300:
        return False
    content_type = MutableHeaders(scope=start).get("content-type", "")
    if content_type.startswith("text/event-stream"):
        payloads = [
            line[5:].strip()
            for line in body.decode("utf-8", "replace").splitlines()
            if line.startswith("data:")
        ]
    else:
        payloads = [body.decode("utf-8", "replace")]
    for payload in payloads:
        message = parse_json(payload.encode())
        if isinstance(message, dict) and "result" in message and "error" not in message:
            return True
    return False


def _is_initialize_request(message: Any) -> bool:
    """An ``initialize`` request (with an id: an initialize notification creates nothing)."""
    return (
        isinstance(message, dict)
        and message.get("method") == "initialize"
        and jsonrpc_id(message) is not None
    )


def _creation_refusal(exc: CapExceeded | ShuttingDown) -> _Refusal:
    if isinstance(exc, ShuttingDown):
        text = "Server is shutting down; retry on another instance"
        return _Refusal(503, INTERNAL_ERROR, text, "shutting_down")
    if exc.scope == "principal":
        text = (
            f"Too many sessions for this credential (limit {exc.limit}); close one with "
            "DELETE or wait for one to expire"
        )
        return _Refusal(429, SERVER_ERROR, text, "cap_principal")
    text = f"Server session limit reached ({exc.limit}); retry later"
    return _Refusal(503, INTERNAL_ERROR, text, "cap_global")


async def _store_call(awaitable: Any) -> Any:
    """Await a store-backed call, turning an unreachable store into a 503 refusal."""
    try:
        return await awaitable
    except StoreUnavailable:
        raise _unavailable() from None


def _unavailable() -> _Refusal:
    logger.warning("Session store unavailable")
    message = "Session store unavailable; retry shortly"
    return _Refusal(503, INTERNAL_ERROR, message, "store_unavailable")


def _expose_session_header(headers: MutableHeaders) -> None:
    existing = headers.get("access-control-expose-headers")
    if existing is None:
        headers["Access-Control-Expose-Headers"] = "Mcp-Session-Id"
    elif "mcp-session-id" not in existing.lower():
        headers["Access-Control-Expose-Headers"] = existing + ", Mcp-Session-Id"
