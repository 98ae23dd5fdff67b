"""The pure-ASGI middleware that owns MCP session lifecycle under a path prefix."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp2anp_middleware.authentication.base import (
    NO_CREDENTIALS,
    AuthenticationError,
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
    credentials_from_header,
)
from mcp2anp_middleware.logging_setup import HotPathLogger, exception_fields
from mcp2anp_middleware.sessions.admin import SessionAdminApp
from mcp2anp_middleware.sessions.background import BackgroundRunner, Service
from mcp2anp_middleware.sessions.clock import Clock, system_clock
from mcp2anp_middleware.sessions.exit_signals import on_exit_signals
from mcp2anp_middleware.sessions.ids import is_well_formed_session_id, short_id
from mcp2anp_middleware.sessions.jsonrpc_errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    UNAUTHORIZED,
    send_jsonrpc_error,
)
from mcp2anp_middleware.sessions.lifespan import run_lifespan
from mcp2anp_middleware.sessions.origin_check import OriginPolicy
from mcp2anp_middleware.sessions.policy import RequestLimits, SessionPolicy
from mcp2anp_middleware.sessions.protocol import is_sessionless_version
from mcp2anp_middleware.sessions.registry import SessionRegistry, ShuttingDown
from mcp2anp_middleware.sessions.request_body import (
    BodyTooLarge,
    ClientGone,
    jsonrpc_id,
    parse_json,
    read_body,
    replay,
)
from mcp2anp_middleware.sessions.request_headers import HEADERS_SCOPE_KEY, RequestHeaders
from mcp2anp_middleware.sessions.state import SERVING, SessionConfig, SessionState
from mcp2anp_middleware.sessions.state_file import load_state_file, save_state_file
from mcp2anp_middleware.sessions.stats import SessionStatsApp, session_statistics
from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    SessionGone,
    SessionStore,
    StoreUnavailable,
)

logger = HotPathLogger(
    "mcp2anp_middleware.sessions.middleware"
)  # lines per request and per session: bound once

SESSION_SCOPE_KEY = "mcp_session"
"""Key of the :class:`SessionState` in ``scope["state"]`` (``request.state.mcp_session``)."""
MESSAGE_SCOPE_KEY = "mcp2anp.message"
"""Scope key of the request's JSON body as the middleware parsed it (POST only), so the MCP app
reads and parses the body once per request rather than twice."""

SESSION_HEADER = "mcp-session-id"
_SESSION_HEADER_B = SESSION_HEADER.encode()
_EXPOSE = b"access-control-expose-headers"
HANDSHAKE_RESERVATION = 30.0
"""Seconds a new session's store record lives before its ``initialize`` answer commits it."""
_NO_HEADERS = RequestHeaders(())
_MAX_HELD_INITIALIZE = 1024 * 1024
SESSION_GONE = "Session ended before it was ready (revoked or expired); initialize again"
"""A new session's answer when it ended while its creating request ran (``initialize``)."""
_IMPLICIT_SESSION_GONE = "Session ended before it was ready (revoked or expired); retry"


class _Refusal(Exception):
    """A request answered with a JSON-RPC error instead of reaching the MCP app."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        reason: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers


class _Creation(enum.Enum):
    """How a request may create its session, and so what makes the creation stick."""

    HANDSHAKE = "handshake"
    """``initialize``: kept when the app answers with a JSON-RPC result."""
    IMPLICIT = "implicit"
    """A session-less-era request: kept when the app answers below 400."""


class _Call:
    """One MCP request as it moves through the middleware; lives in the request's own frame."""

    # One is made for every request: what starts the same for all is a class attribute.
    headers = _NO_HEADERS
    """Read by the first check (:meth:`MCPSessionMiddleware._checked`)."""
    message: Any = None
    started = False
    finished = False
    replaced = False
    """The app's answer was replaced by a refusal; what it still sends is dropped."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]

    async def send_existing(self, message: Message) -> None:
        """The answer to a request of an existing session: no id to add or commit, only the
        app's own session header dropped (the common case: every message of every answer)."""
        if message["type"] == "http.response.start":
            _strip_session_header(message)
            self.started = True
        elif not message.get("more_body", False):
            self.finished = True
        await self.send(message)

    async def send_tracked(self, message: Message) -> None:
        """Send, remembering how far the answer got (for a request cut short)."""
        if message["type"] == "http.response.start":
            self.started = True
        elif not message.get("more_body", False):
            self.finished = True
        await self.send(message)


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
        authenticator: Authenticator | None = None,
        store: SessionStore | None = None,
        policy: SessionPolicy | None = None,
        limits: RequestLimits | None = None,
        shutdown_grace: float = 10.0,
        state_file: Path | str | None = None,
        stats_path: str | None = None,
        stats_token: str | None = None,
        admin_token: str | None = None,
        admin_path: str = "/mcp-admin",
        services: Sequence[Service] = (),
        clock: Clock = system_clock,
    ) -> None:
        if not path_prefix.startswith("/") or (path_prefix != "/" and path_prefix.endswith("/")):
            raise ValueError("path_prefix must start with '/' and not end with '/'")
        policy = policy if policy is not None else SessionPolicy()
        limits = limits if limits is not None else RequestLimits()
        self.app = app
        self.mcp_app = mcp_app if mcp_app is not None else app
        self.path_prefix = path_prefix
        self._prefix_slash = path_prefix.rstrip("/") + "/"
        self.policy = policy
        self.limits = limits
        self.authenticator: Authenticator = (
            authenticator if authenticator is not None else StaticConfigAuthenticator()
        )
        self.registry = SessionRegistry(
            store=store,
            session_timeout=policy.timeout,
            max_session_age=policy.max_age,
            clock=clock,
            touch_interval=policy.touch_interval,
            per_principal_cap=policy.per_principal_cap,
            global_cap=policy.global_cap,
            evict_oldest=policy.cap_policy == "evict_oldest",
            lease=2 * policy.cleanup_interval,
        )
        self.background = BackgroundRunner(
            self.registry,
            cleanup_interval=policy.cleanup_interval,
            services=[self.registry.follow_other_processes, *services],
        )
        bind = getattr(self.mcp_app, "bind_registry", None)
        if callable(bind):  # an MCP endpoint with sessions of its own machinery (MCPEndpoint)
            bind(self.registry)
        self.origins = OriginPolicy(limits.allowed_origins)
        self.stats_path = stats_path
        # Statistics and administration are small apps of their own, routed here by exact path.
        self._side_apps: dict[str, ASGIApp] = {}
        if stats_path is not None:
            self._side_apps[stats_path] = SessionStatsApp(self.registry, token=stats_token)
        if admin_token is not None:
            admin = SessionAdminApp(self.registry, token=admin_token, path=admin_path)
            if f"{admin.path}/sessions" in self._side_apps:
                raise ValueError(f"{admin.path}/sessions is both the statistics and the admin path")
            self._side_apps[f"{admin.path}/sessions"] = admin
        for side_path in self._side_apps:  # (the prefix's requests never reach them)
            if side_path == self.path_prefix or side_path.startswith(self._prefix_slash):
                raise ValueError(f"{side_path} is under the MCP prefix {self.path_prefix}")
        self.shutdown_grace = shutdown_grace
        self.state_file = Path(state_file) if state_file is not None else None
        self.started_at = time.time()
        self._stopped = False
        self._started = False
        self._undo_exit_signals: Callable[[], None] | None = None
        self._starting: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

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
            side_app = self._side_apps.get(path) if self._side_apps else None
            if side_app is not None:
                await side_app(scope, receive, send)
                return
        elif scope_type == "lifespan":
            await run_lifespan(
                self.app, scope, receive, send, startup=self.startup, shutdown=self.shutdown
            )
            return
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Restore saved sessions, start the cleanup loop and services (lifespan, or lazily).

        One start or stop at a time: the first requests of a host without lifespan events each
        start the middleware, and none may be served before the saved sessions are back. The
        state file is read (and deleted) at every start: one written by an earlier stop of this
        process restores nothing new, and left in place it could bring back, after a crash,
        sessions deleted since."""
        async with self._start_lock():
            await self._start()

    async def _start_for_request(self) -> bool:
        """Start for a request of a host without lifespan events (unless another request just
        did); False if the middleware was stopped meanwhile."""
        async with self._start_lock():
            if self.background.ready:
                return True
            if self._stopped:
                return False
            await self._start()
            return True

    async def _start(self) -> None:
        self._started = True
        self._stopped = False
        self.registry.accepting = True  # (before the restore: its sessions are registered)
        if self.state_file is not None:
            restored = await load_state_file(self.registry, self.state_file)
            if restored:
                logger.info("Sessions restored from state file", count=restored)
        await self.background.start()
        if callable(getattr(self.mcp_app, "end_streams", None)):
            if self._undo_exit_signals is not None:  # (a start after a stop that never ran)
                self._undo_exit_signals()
            self._undo_exit_signals = on_exit_signals(self._server_stopping)

    def _server_stopping(self) -> None:
        """The server was told to stop (SIGTERM, SIGINT): its open GET streams end now (clients
        reconnect, to another worker). The server waits for every open connection before the
        lifespan's shutdown comes, so ending them there (as :meth:`shutdown` also does) came
        only once the server's own timeout had cancelled every request still running."""
        end_streams = getattr(self.mcp_app, "end_streams", None)
        if callable(end_streams):
            end_streams()

    def _start_lock(self) -> asyncio.Lock:
        """The lock of starts and stops, one per event loop (a lock belongs to its loop)."""
        loop = asyncio.get_running_loop()
        if self._starting is None or self._starting[0] is not loop:
            self._starting = (loop, asyncio.Lock())
        return self._starting[1]

    async def shutdown(self) -> None:
        """Stop taking new sessions, let in-flight requests finish (bounded), then stop."""
        async with self._start_lock():  # after a start under way; one queued finds it stopped
            await self._stop()

    async def _stop(self) -> None:
        registry = self.registry
        registry.accepting = False
        self._stopped = True
        if self._undo_exit_signals is not None:
            self._undo_exit_signals()
            self._undo_exit_signals = None
        self._server_stopping()  # open GET streams would hold the drain for its whole grace
        if not await registry.wait_idle(self.shutdown_grace):
            logger.warning("Shutting down with requests still in flight", count=registry.in_flight)
        await self.background.stop()
        if not await registry.settle(self.shutdown_grace):
            logger.warning("Shutting down before refused sessions could be removed from the store")
        if self.state_file is not None and self._started:  # (else the file was never read)
            try:
                saved = await save_state_file(registry, self.state_file)
            except OSError as exc:  # (a read-only or full disk): the rest of the stop goes on
                logger.warning("Sessions not saved to state file", error=type(exc).__name__)
            else:
                logger.info("Sessions saved to state file", count=saved)
        await registry.close_local()
        try:
            await registry.store.aclose()
        except Exception:  # pragma: no cover - closing a broken connection
            logger.warning("Session store did not close cleanly")

    # -- MCP requests ---------------------------------------------------------------------------

    async def _handle_mcp(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check headers and credentials, then the body, then route; every refusal is a JSON-RPC
        error. Whatever can be refused from the headers is refused before the body is read, so a
        refusal costs the same for a 4 MiB body as for an empty one."""
        if not self.background.ready:
            if self._stopped:
                await send_jsonrpc_error(
                    send, 503, INTERNAL_ERROR, "Server is shutting down; retry on another instance"
                )
                return
            try:  # servers without lifespan events (httpx.ASGITransport...)
                started = await self._start_for_request()
            except Exception:
                logger.error("Middleware startup failed", **exception_fields())
                await send_jsonrpc_error(
                    send, 503, INTERNAL_ERROR, "Server is not ready; retry shortly"
                )
                return
            if not started:  # stopped while this request waited for the start
                await send_jsonrpc_error(
                    send, 503, INTERNAL_ERROR, "Server is shutting down; retry on another instance"
                )
                return
        call = _Call(scope, receive, send)
        try:
            await self._checked(call)
        except _Refusal as refusal:
            await self._refuse(call, refusal)
        except ClientGone:
            return  # nobody is left to answer
        except asyncio.CancelledError:
            # The server gave up on this request (uvicorn past its graceful-shutdown timeout,
            # a host timeout): answer it rather than leave the server to send a plain-text 500.
            await self._cut_short(call)

    async def _checked(self, call: _Call) -> None:
        scope = call.scope
        headers = call.headers = RequestHeaders(scope["headers"])
        if headers.origins > 1:
            raise _Refusal(400, INVALID_REQUEST, "Multiple Origin headers", "malformed")
        if not self.origins.allows(headers.origin):
            raise _Refusal(403, INVALID_REQUEST, "Forbidden: Origin not allowed", "origin")
        if call.method == "OPTIONS":  # CORS preflight carries no credentials or session
            await self.mcp_app(scope, call.receive, call.send_tracked)
            return
        if not headers.names_ok:
            text = "Header names must be lower-case ASCII"
            raise _Refusal(400, INVALID_REQUEST, text, "malformed")
        if headers.versions > 1:
            raise _Refusal(
                400, INVALID_REQUEST, "Multiple MCP-Protocol-Version headers", "malformed"
            )
        if headers.credentials > 1:
            text = "Send one credential: a single Authorization or X-API-Key header"
            raise _Refusal(400, INVALID_REQUEST, text, "malformed")
        if headers.session_ids > 1:
            raise _Refusal(400, INVALID_REQUEST, "Multiple Mcp-Session-Id headers", "malformed")
        credential = headers.credential
        config = await self._authenticate(
            NO_CREDENTIALS if credential is None else credentials_from_header(*credential)
        )
        if is_sessionless_version(headers.version):
            await self._sessionless(call, config, headers.session_id is not None)
        elif headers.session_id is not None:
            await self._with_session(call, config, headers.session_id.decode("latin-1"))
        else:
            await self._handshake(call, config)

    async def _sessionless(self, call: _Call, config: SessionConfig, had_id: bool) -> None:
        """2026-07-28: the principal's implicit session, created only for a request the app
        serves; the era has no GET stream and no DELETE."""
        if call.method != "POST":
            text = f"{call.method} is not supported by this protocol version; use POST"
            raise _Refusal(405, INVALID_REQUEST, text, "method", headers=[(b"allow", b"POST")])
        message = await self._read_message(call)
        if not _is_jsonrpc_message(message):
            raise _Refusal(400, INVALID_REQUEST, "Body is not a JSON-RPC message", "malformed")
        try:
            state, created = await _store_call(self.registry.implicit_session(config))
        except (CapExceeded, ShuttingDown) as exc:
            raise _creation_refusal(exc) from None
        # Still uncommitted (the request that created it runs yet): this one may commit it too,
        # and, refused, may be the last one out that removes it.
        created = created or self.registry.awaiting_commit(state)
        scope = call.scope
        if had_id:  # the spec says to ignore it in this era
            scope = dict(scope)
            scope["headers"] = [h for h in scope["headers"] if h[0] != _SESSION_HEADER_B]
        await self._serve(call, state, scope, created=_Creation.IMPLICIT if created else None)

    async def _with_session(self, call: _Call, config: SessionConfig, raw: str) -> None:
        if call.method == "POST":  # authenticated: read it so a refusal can echo the id
            await self._read_message(call)
        if not is_well_formed_session_id(raw):
            raise _Refusal(400, INVALID_REQUEST, "Malformed Mcp-Session-Id header", "malformed")
        registry = self.registry
        try:
            found = await registry.get(raw, config)
        except StoreUnavailable:
            raise _unavailable() from None
        if found is None:
            raise _Refusal(404, INVALID_REQUEST, "Session not found", "unknown_session")
        if call.method == "DELETE":
            await _store_call(registry.remove(raw, reason="deleted"))
            logger.info("Session closed by client DELETE request", session_id=short_id(raw))
            await call.send_tracked({"type": "http.response.start", "status": 204, "headers": []})
            await call.send_tracked({"type": "http.response.body", "body": b""})
            return
        if logger.enabled(logging.DEBUG):
            logger.debug("Using existing session", session_id=short_id(raw))
        await self._serve(call, found, call.scope, created=None)

    async def _handshake(self, call: _Call, config: SessionConfig) -> None:
        """No session id: only an ``initialize`` request may come, and it creates one."""
        if call.method != "POST":
            raise _Refusal(400, INVALID_REQUEST, "Missing Mcp-Session-Id header", "missing_session")
        message = await self._read_message(call)
        if not _is_initialize_request(message):
            raise _Refusal(400, INVALID_REQUEST, "Missing Mcp-Session-Id header", "missing_session")
        registry = self.registry
        state = registry.new_session(config)
        try:
            await _store_call(registry.register(state, reservation=HANDSHAKE_RESERVATION))
        except (CapExceeded, ShuttingDown) as exc:
            raise _creation_refusal(exc) from None
        await self._serve(call, state, call.scope, created=_Creation.HANDSHAKE)

    async def _read_message(self, call: _Call) -> Any:
        """Read the body (bounded in size and time), hand it on to the app, and parse it."""
        try:
            limits = self.limits
            body = await read_body(
                call.receive,
                limits.max_body_size,
                limits.body_timeout,
                declared=call.headers.content_length,
            )
        except BodyTooLarge:
            message = f"Request body exceeds {self.limits.max_body_size} bytes"
            raise _Refusal(413, INVALID_REQUEST, message, "too_large") from None
        except TimeoutError:
            message = f"Request body not received within {self.limits.body_timeout:g} seconds"
            raise _Refusal(408, INVALID_REQUEST, message, "body_timeout") from None
        call.receive = replay(body, call.receive)
        call.message = parse_json(body)
        if call.message is None:
            if body.strip() == b"null":  # JSON, but no JSON-RPC message
                text = "Body is not a JSON-RPC message"
                raise _Refusal(400, INVALID_REQUEST, text, "malformed")
            raise _Refusal(400, PARSE_ERROR, "Parse error: body is not JSON", "malformed")
        return call.message

    async def _authenticate(self, credentials: Credentials) -> SessionConfig:
        try:
            return await self.authenticator(credentials)
        except AuthenticationError as exc:
            reason = "unauthorized" if exc.status == 401 else "auth_unavailable"
            raise _Refusal(
                exc.status, UNAUTHORIZED, str(exc) or "Authentication required", reason
            ) from None
        except Exception:
            logger.error("Authenticator failed", **exception_fields())
            message = "Credential check unavailable; retry shortly"
            raise _Refusal(503, UNAUTHORIZED, message, "auth_unavailable") from None

    async def _refuse(self, call: _Call, refusal: _Refusal) -> None:
        self.registry.stats.rejected[refusal.reason] += 1
        if call.started:
            return  # the app had begun its answer (a failed commit after that is logged)
        headers = list(refusal.headers)
        if refusal.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="mcp"'))
        elif refusal.status in (429, 503):
            headers.append((b"retry-after", b"5"))
        elif refusal.status == 408:
            headers.append((b"connection", b"close"))
        await send_jsonrpc_error(
            call.send,
            refusal.status,
            refusal.code,
            refusal.message,
            request_id=jsonrpc_id(call.message),
            headers=headers,
        )

    async def _cut_short(self, call: _Call) -> None:
        """Finish a request the server cancelled: a JSON-RPC 503 if no answer had started, else
        end the stream. Shielded so the answer goes out; the cancellation is not re-raised, the
        request simply ends (no traceback in the log, no plain-text 500 from the server)."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        self.registry.stats.rejected["cut_short"] += 1
        logger.warning("Request cut short by the server", answered=not call.started)
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(1.0),
            contextlib.suppress(Exception),
        ):
            if not call.started:
                text = "Request cut short: the server is shutting down; retry on another instance"
                await send_jsonrpc_error(
                    call.send,
                    503,
                    INTERNAL_ERROR,
                    text,
                    request_id=jsonrpc_id(call.message),
                    headers=[(b"retry-after", b"1"), (b"connection", b"close")],
                )
            elif not call.finished:
                await call.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _serve(
        self, call: _Call, state: SessionState, scope: Scope, *, created: _Creation | None
    ) -> None:
        """Run the MCP app with ``state`` in scope (see :meth:`_serve_created` for a session this
        request created)."""
        scope = {
            **scope,
            "state": {**scope.get("state", {}), SESSION_SCOPE_KEY: state},
            HEADERS_SCOPE_KEY: call.headers,  # read here already: not again
        }
        if call.message is not None:  # parsed here already: the app need not parse it again
            scope[MESSAGE_SCOPE_KEY] = call.message
        if created is not None:
            await self._serve_created(call, state, scope, created)
            return
        registry = self.registry
        try:
            await registry.acquire(state)
        except StoreUnavailable:
            raise _unavailable() from None
        serving_token = SERVING.set(weakref.ref(state))  # the app's code finds its session
        try:
            await self.mcp_app(scope, call.receive, call.send_existing)
        finally:
            SERVING.reset(serving_token)
            try:
                await registry.release(state)  # shielded from cancellation where it writes
            except StoreUnavailable:
                logger.warning("Session store unavailable while ending a request")

    async def _serve_created(
        self, call: _Call, state: SessionState, scope: Scope, created: _Creation
    ) -> None:
        """Run the MCP app for the request that created ``state``.

        The session is kept only if the app serves the request: an ``initialize`` needs a
        JSON-RPC result (that small answer is held back until complete, then sent with the new
        id); an implicit session needs a request (not a notification or a response) answered
        with a status below 400. Otherwise the creation is discarded, so a refused request leaves
        the store as it found it.
        """
        registry = self.registry
        committed = False
        held_start: Message | None = None
        held_body: list[bytes] = []
        held_size = 0

        async def commit_or_refuse() -> bool:
            """Commit the creation; if that fails, a 503 replaces the app's answer."""
            nonlocal committed
            try:
                await registry.commit(state)
            except SessionGone:  # not an outage: the client starts again, now
                logger.info(
                    "New session ended before its creation completed",
                    session_id=short_id(state.session_id),
                )
                gone = SESSION_GONE if created is _Creation.HANDSHAKE else _IMPLICIT_SESSION_GONE
                await refuse("session_gone", gone, b"1")
                return False
            except StoreUnavailable:
                logger.warning("Session store unavailable while committing a new session")
                await refuse("store_unavailable", "Session store unavailable; retry shortly", b"5")
                return False
            committed = True
            return True

        async def refuse(reason: str, message: str, retry_after: bytes) -> None:
            registry.stats.rejected[reason] += 1
            call.replaced = True
            await send_jsonrpc_error(
                call.send_tracked,
                503,
                INTERNAL_ERROR,
                message,
                request_id=jsonrpc_id(call.message),
                headers=[(b"retry-after", retry_after)],
            )

        async def send_with_session(message: Message) -> None:
            nonlocal held_start, held_size
            if call.replaced:
                return
            if message["type"] == "http.response.start":
                _strip_session_header(message)
                if created is _Creation.HANDSHAKE:
                    held_start = message
                    return
                serving = (  # (a notification or a response makes no session)
                    created is _Creation.IMPLICIT
                    and message["status"] < 400
                    and _is_request(call.message)
                )
                if serving and not await commit_or_refuse():
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
                    if not await commit_or_refuse():
                        return
                    _add_session_header(start, state.session_id)
                await call.send_tracked(start)
                await call.send_tracked(
                    {"type": "http.response.body", "body": body, "more_body": more}
                )
                return
            await call.send_tracked(message)

        try:
            await registry.acquire(state)
        except StoreUnavailable:
            await registry.discard(state)
            raise _unavailable() from None
        except BaseException:  # cancelled inside the store's write: refused all the same
            registry.discard_later(state)
            raise
        serving_token = SERVING.set(weakref.ref(state))  # the app's code finds its session
        try:
            await self.mcp_app(scope, call.receive, send_with_session)
        finally:
            SERVING.reset(serving_token)
            # Kept: committed by this request, or (an implicit session) by another of its own.
            if committed or (state.implicit and not registry.awaiting_commit(state)):
                try:
                    await registry.release(state)  # shielded from cancellation where it writes
                except StoreUnavailable:
                    logger.warning("Session store unavailable while ending a request")
            else:
                registry.leave(state)  # no await: bookkeeping survives cancellation
                await registry.discard(state)

    async def statistics(self) -> dict[str, Any]:
        """Counters and gauges for monitoring (also served at ``stats_path`` when enabled)."""
        return await session_statistics(self.registry, started_at=self.started_at)


def _strip_session_header(start: Message) -> None:
    """This middleware is the only source of session ids: drop any the app set itself."""
    headers = start.get("headers")
    if headers is None:
        start["headers"] = []  # optional in ASGI; later code appends to it
    elif not isinstance(headers, list):
        start["headers"] = [(n, v) for n, v in headers if n.lower() != _SESSION_HEADER_B]
    else:
        for name, _ in headers:  # (a loop, not any(): this runs for every answer)
            if name.lower() == _SESSION_HEADER_B:
                start["headers"] = [(n, v) for n, v in headers if n.lower() != _SESSION_HEADER_B]
                return


def _initialize_succeeded(start: Message, body: bytes) -> bool:
    """True when an ``initialize`` answer is 2xx and carries a JSON-RPC result (JSON or SSE)."""
    if not 200 <= start["status"] < 300:
        return False
    content_type = _header(start, b"content-type") or ""
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


def _is_jsonrpc_message(message: Any) -> bool:
    """A JSON-RPC 2.0 request, notification or response object (no batches in this era)."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return False
    if "method" in message:
        return isinstance(message["method"], str)
    return "id" in message and ("result" in message) != ("error" in message)


def _is_request(message: Any) -> bool:
    """A JSON-RPC request (a method and an id), as opposed to a notification or a response."""
    return isinstance(message, dict) and "method" in message and jsonrpc_id(message) is not None


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


def _header(start: Message, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) in a response start."""
    for key, value in start["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _add_session_header(start: Message, session_id: str) -> None:
    """Give a new session's id to the client (the start went through
    :func:`_strip_session_header`, so it carries no other) and let browsers read it. The list
    is copied: an app may send the same headers list with every response."""
    exposed = _header(start, _EXPOSE)
    headers = list(start["headers"])
    headers.append((_SESSION_HEADER_B, session_id.encode("latin-1")))
    if exposed is None:
        headers.append((_EXPOSE, b"Mcp-Session-Id"))
    elif "mcp-session-id" not in exposed.lower():
        headers = [(key, value) for key, value in headers if key.lower() != _EXPOSE]
        headers.append((_EXPOSE, (exposed + ", Mcp-Session-Id").encode("latin-1")))
    start["headers"] = headers
