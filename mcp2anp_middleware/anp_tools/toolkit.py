"""The two ANP tools, ``anp_fetchDoc`` and ``anp_invokeOpenRPC``, bound to each MCP session.

Each session signs with its own DID: the tool finds the session's :class:`SessionState` in the
request scope and uses the :class:`ANPToolHandler` attached to it under ``"anp"`` (with the
session's :class:`SessionCrawler`: its signer and document cache). It is created on the session's
first tool call, so idle sessions stay small; creation has no ``await`` in it, so concurrent first
calls cannot create two. :meth:`ANPToolkit.release`, subscribed to the registry's session events,
drops it when the session ends. Failures are returned as tool errors (``isError: true``) with
a stable code.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult
from pydantic import Field, WithJsonSchema

from mcp2anp_middleware.anp_tools.credentials import CredentialCache, CredentialError
from mcp2anp_middleware.anp_tools.dispatch import install_direct_route
from mcp2anp_middleware.anp_tools.documents import (
    DEFAULT_SESSION_CACHE_BYTES,
    PROCESS_CACHE_BUDGET,
    CacheBudget,
    DocumentCache,
    analyse_document,
)
from mcp2anp_middleware.anp_tools.errors import ANPToolError
from mcp2anp_middleware.anp_tools.http import ANPHttpClient, HttpResult
from mcp2anp_middleware.anp_tools.signing import SessionSigner
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.log_redaction import redact_url, redact_urls
from mcp2anp_middleware.logging_setup import HotPathLogger, exception_fields
from mcp2anp_middleware.sessions.clock import Clock, system_clock
from mcp2anp_middleware.sessions.events import SessionEvent
from mcp2anp_middleware.sessions.request_helpers import current_session, session_from_request
from mcp2anp_middleware.sessions.state import SessionConfig, SessionState

ATTACHMENT = "anp"
"""Key of the session's :class:`ANPToolHandler` in :attr:`SessionState.attachments`."""

logger = HotPathLogger("mcp2anp_middleware.tools")  # bound once, not per line

FETCH_DOC_DESCRIPTION = (
    "Fetch an ANP (Agent Network Protocol) document by URL, signed with this session's DID: an "
    "agent description (ad.json), an OpenRPC interface document or any linked document. Returns "
    "the document (parsed JSON when it is JSON), its HTTP status and content type, the links you "
    "can follow next (interfaces, JSON-RPC endpoints, other URLs), and the callable methods "
    "it describes (name, endpoint, params). Start from the agent description URL, follow an "
    "interface link, then call a method with anp_invokeOpenRPC."
)
INVOKE_DESCRIPTION = (
    "Call a JSON-RPC 2.0 method on an ANP agent, signed with this session's DID. Use the "
    "'endpoint' and method 'name' found by anp_fetchDoc in an OpenRPC document. Returns the "
    "method's result, or an error with the agent's JSON-RPC code, message and data."
)


CACHE_ENTRY_OVERHEAD = 1024
"""Bytes charged per cached document on top of its body and strings: the entry, the response
object, the dictionary slots and the process budget's index (measured under 500 on CPython
3.11; charged twice that so that the byte budgets are not underestimates)."""


class SessionCrawler:
    """Per-session ANP client state: the signer (with agent-issued tokens) and a document cache.

    The cache holds the raw responses of ``anp_fetchDoc`` (parsed again on a hit): at most
    ``cache_size`` documents and ``cache_bytes`` bytes for ``cache_ttl`` seconds, charged to the
    process-wide ``cache_budget``. It is created on the first document stored.
    """

    __slots__ = (
        "_cache",
        "cache_budget",
        "cache_bytes",
        "cache_size",
        "cache_ttl",
        "clock",
        "signer",
    )

    def __init__(
        self,
        signer: SessionSigner,
        *,
        cache_ttl: float,
        cache_size: int,
        clock: Clock,
        cache_bytes: int = DEFAULT_SESSION_CACHE_BYTES,
        cache_budget: CacheBudget | None = None,
    ) -> None:
        self.signer = signer
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.cache_budget = cache_budget if cache_budget is not None else PROCESS_CACHE_BUDGET
        self.clock = clock
        self._cache: DocumentCache[HttpResult] | None = None

    @property
    def cache(self) -> DocumentCache[HttpResult] | None:
        """The session's document cache, None until a first document was stored."""
        return self._cache

    def cached(self, url: str) -> HttpResult | None:
        if self._cache is None:
            return None
        return self._cache.get(url)

    def remember(self, url: str, result: HttpResult) -> None:
        if self.cache_size <= 0 or self.cache_bytes <= 0:
            return
        if self._cache is None:
            self._cache = DocumentCache(
                ttl=self.cache_ttl,
                max_entries=self.cache_size,
                max_bytes=self.cache_bytes,
                budget=self.cache_budget,
                clock=self.clock,
            )
        self._cache.put(url, result, cache_weight(url, result))

    def close(self) -> None:
        """Release the cached documents now. Optional: dropping the crawler releases them too
        (the cache's finalizer), this only makes it independent of when that happens."""
        if self._cache is not None:
            self._cache.clear()


def cache_weight(url: str, result: HttpResult) -> int:
    """Bytes a cached response is charged: its body and strings (what it holds, exactly, for
    ASCII text) plus a fixed overhead per entry."""
    strings = (url, result.url, result.content_type, result.location)
    return len(result.body) + sum(len(text) for text in strings) + CACHE_ENTRY_OVERHEAD


class ANPToolHandler:
    """Implements the two tools for one session."""

    __slots__ = ("config", "crawler", "http")

    def __init__(
        self, crawler: SessionCrawler, http: ANPHttpClient, config: SessionConfig | None = None
    ) -> None:
        self.crawler = crawler
        self.http = http
        self.config = config
        """The credential the crawler signs with; a session whose credential changed gets a new
        handler."""

    async def fetch_doc(self, url: str) -> dict[str, Any]:
        cached = self.crawler.cached(url)
        if cached is not None:  # raw bytes are cached: parsed (and checked) again
            return {**_document_payload(cached), "cached": True}
        result = await self.http.request(self.crawler.signer, "GET", url)
        if not 200 <= result.status < 300:
            raise ANPToolError(
                "HTTP_ERROR",
                f"{url} answered HTTP {result.status}",
                status=result.status,
                url=result.url,
                body=result.text()[:500],
            )
        payload = _document_payload(result)
        self.crawler.remember(url, result)
        return payload

    async def invoke_openrpc(
        self, endpoint: str, method: str, params: Any, request_id: str | int | None
    ) -> dict[str, Any]:
        rpc_id: str | int = request_id if request_id is not None else uuid.uuid4().hex
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": rpc_id}
        if params is not None:
            request["params"] = params
        result = await self.http.request(self.crawler.signer, "POST", endpoint, json_body=request)
        try:
            answer = result.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or ("result" not in answer and "error" not in answer):
            code = "HTTP_ERROR" if not 200 <= result.status < 300 else "INVALID_RESPONSE"
            raise ANPToolError(
                code,
                f"{endpoint} answered HTTP {result.status} without a JSON-RPC response",
                status=result.status,
                body=result.text()[:500],
            )
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise ANPToolError(
                "JSONRPC_ERROR",
                f"{method} failed: {error.get('message', 'error')}",
                jsonrpc_code=error.get("code"),
                data=error.get("data"),
                status=result.status,
                request_id=answer.get("id", rpc_id),
            )
        return {
            "endpoint": endpoint,
            "method": method,
            "request_id": answer.get("id", rpc_id),
            "status": result.status,
            "result": answer["result"],
        }


def _document_payload(result: HttpResult) -> dict[str, Any]:
    """``anp_fetchDoc``'s result for a 2xx response: the document, parsed when it is JSON."""
    document: Any
    try:
        document = result.json()
        is_json = True
    except ValueError:
        document, is_json = result.text(), False
    links, methods = analyse_document(result.url, document) if is_json else ([], [])
    return {
        "url": result.url,
        "status": result.status,
        "content_type": result.content_type,
        "document": document,
        "links": links,
        "methods": methods,
    }


class ANPToolkit:
    """Shared pieces of the ANP tools in one process: policy, pooled HTTP client, credentials."""

    def __init__(
        self,
        *,
        url_policy: URLPolicy | None = None,
        entry_url: str | None = None,
        credentials: CredentialCache | None = None,
        http_client: ANPHttpClient | None = None,
        document_cache_ttl: float = 60.0,
        document_cache_size: int = 32,
        document_cache_bytes: int = DEFAULT_SESSION_CACHE_BYTES,
        document_cache_budget: CacheBudget | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.url_policy = url_policy if url_policy is not None else URLPolicy()
        self.entry_url = entry_url
        self.credentials = credentials if credentials is not None else CredentialCache()
        self.http = http_client if http_client is not None else ANPHttpClient(self.url_policy)
        self.document_cache_ttl = document_cache_ttl
        self.document_cache_size = document_cache_size
        self.document_cache_bytes = document_cache_bytes
        self.document_cache_budget = (
            document_cache_budget if document_cache_budget is not None else PROCESS_CACHE_BUDGET
        )
        self.clock = clock

    def instructions(self) -> str:
        text = (
            "Tools to browse and use the Agent Network Protocol (ANP) network. Fetch an agent "
            "description with anp_fetchDoc, follow its interface links to find methods, then call "
            "them with anp_invokeOpenRPC. Requests are signed with this session's DID."
        )
        if self.entry_url:
            text += f" Start at {self.entry_url}."
        return text

    def handler_for(self, state: SessionState) -> ANPToolHandler:
        """The session's handler, created on first use (no await: exactly once per session), and
        again when the session's credential changed (a rotated key signs from its next call)."""
        handler = state.attachment(ATTACHMENT)
        if isinstance(handler, ANPToolHandler) and handler.config == state.config:
            return handler
        credential = self.credentials.get(state.config)
        crawler = SessionCrawler(
            SessionSigner(credential),
            cache_ttl=self.document_cache_ttl,
            cache_size=self.document_cache_size,
            clock=self.clock,
            cache_bytes=self.document_cache_bytes,
            cache_budget=self.document_cache_budget,
        )
        if isinstance(handler, ANPToolHandler):
            handler.crawler.close()
        handler = ANPToolHandler(crawler, self.http, state.config)
        state.attach(ATTACHMENT, handler)
        return handler

    def release(self, event: SessionEvent) -> None:
        """Session event subscriber: a session that ended drops its crawler (documents, tokens)."""
        if event.kind.ends_session and event.state is not None:
            handler = event.state.detach(ATTACHMENT)
            if isinstance(handler, ANPToolHandler):
                handler.crawler.close()

    @asynccontextmanager
    async def service(self) -> AsyncIterator[None]:
        """Keeps the pooled HTTP client for the server's lifetime and closes it at shutdown."""
        try:
            yield
        finally:
            await self.http.aclose()

    def register(self, server: MCPServer) -> None:
        """Add the two tools to ``server``; their calls take the direct route of
        :mod:`~mcp2anp_middleware.anp_tools.dispatch` where the server allows it."""
        toolkit = self

        async def anp_fetchDoc(
            url: Annotated[
                str,
                Field(description="Absolute http(s) URL of the ANP document to fetch."),
            ],
            ctx: Context,
        ) -> CallToolResult:
            return CallToolResult.model_validate(await toolkit.fetch_doc(_request_of(ctx), url))

        async def anp_invokeOpenRPC(
            endpoint: Annotated[
                str, Field(description="JSON-RPC endpoint URL (an OpenRPC 'servers' URL).")
            ],
            method: Annotated[str, Field(description="Name of the method to call.")],
            ctx: Context,
            params: Annotated[
                dict[str, Any] | list[Any] | None,
                # Written out: pydantic's own schema has an empty ``items: {}``, which strict
                # JSON Schema validators (the MCP Inspector's --strict) flag as carrying no keyword.
                WithJsonSchema(
                    {
                        "anyOf": [{"type": "object"}, {"type": "array"}, {"type": "null"}],
                        "default": None,
                        "description": "Method parameters: an object (by name) or an array.",
                    }
                ),
            ] = None,
            request_id: Annotated[
                str | int | None,
                Field(description="JSON-RPC id to send; generated when omitted."),
            ] = None,
        ) -> CallToolResult:
            request = _request_of(ctx)
            answer = await toolkit.invoke_openrpc(request, endpoint, method, params, request_id)
            return CallToolResult.model_validate(answer)

        server.add_tool(anp_fetchDoc, name="anp_fetchDoc", description=FETCH_DOC_DESCRIPTION)
        server.add_tool(anp_invokeOpenRPC, name="anp_invokeOpenRPC", description=INVOKE_DESCRIPTION)

        async def fetch_direct(ctx: Any, arguments: dict[str, Any]) -> dict[str, Any]:
            return await toolkit.fetch_doc(ctx.request, arguments["url"])

        async def invoke_direct(ctx: Any, arguments: dict[str, Any]) -> dict[str, Any]:
            return await toolkit.invoke_openrpc(
                ctx.request,
                arguments["endpoint"],
                arguments["method"],
                arguments["params"],
                arguments["request_id"],
            )

        install_direct_route(
            server, {"anp_fetchDoc": fetch_direct, "anp_invokeOpenRPC": invoke_direct}
        )

    async def fetch_doc(self, request: Any, url: str) -> dict[str, Any]:
        """``anp_fetchDoc`` for the session of ``request`` (or of the task): the wire result."""
        return await self._run(request, "anp_fetchDoc", lambda h: h.fetch_doc(url), url=url)

    async def invoke_openrpc(
        self,
        request: Any,
        endpoint: str,
        method: str,
        params: dict[str, Any] | list[Any] | None,
        request_id: str | int | None,
    ) -> dict[str, Any]:
        """``anp_invokeOpenRPC`` for the session of ``request`` (or of the task)."""
        return await self._run(
            request,
            "anp_invokeOpenRPC",
            lambda h: h.invoke_openrpc(endpoint, method, params, request_id),
            url=endpoint,
            method=method,
        )

    async def _run(self, request: Any, tool: str, call: Any, **log_fields: str) -> dict[str, Any]:
        """Run one tool call in its session; the ``CallToolResult`` as its wire dict (the SDK's
        result sieve validates it), a failure as a tool error with a stable code."""
        state = _session_of(request)
        try:
            if state is None:
                raise ANPToolError("CREDENTIAL_ERROR", "no MCP session is attached to this call")
            try:
                handler = self.handler_for(state)
            except CredentialError as exc:
                raise ANPToolError("CREDENTIAL_ERROR", str(exc)) from None
            try:
                payload = await call(handler)
                text = json.dumps(payload, ensure_ascii=False)
            except ANPToolError:
                raise
            except Exception as exc:  # a bug or a library surprise: still a tool error, no 500
                logger.error("ANP tool crashed", tool=tool, **exception_fields())
                raise ANPToolError(
                    "INTERNAL_ERROR", f"the tool failed unexpectedly ({type(exc).__name__})"
                ) from None
        except ANPToolError as exc:
            logger.info("ANP tool failed", tool=tool, code=exc.code, **_redacted(log_fields))
            body = exc.to_payload()
            return _result(json.dumps(body, ensure_ascii=False), body, is_error=True)
        if logger.enabled(logging.DEBUG):  # the fields cost more than the filtered line
            logger.debug("ANP tool succeeded", tool=tool, **_redacted(log_fields))
        return _result(text, payload, is_error=False)


def _result(text: str, structured: dict[str, Any], *, is_error: bool) -> dict[str, Any]:
    """A ``CallToolResult`` on the wire: the payload as text (for clients that read only
    ``content``) and as ``structuredContent``."""
    return {
        "content": [{"type": "text", "text": text}],
        "structuredContent": structured,
        "isError": is_error,
        "resultType": "complete",
    }


def _redacted(log_fields: dict[str, str]) -> dict[str, str]:
    """URLs come from the client and may carry secrets in their query: host and path only (a
    ``url`` field cut as a whole; URLs inside other fields, such as a method name, too)."""
    return {
        name: redact_url(value) if name == "url" else redact_urls(value)
        for name, value in log_fields.items()
    }


def _request_of(ctx: Context) -> Any:
    """The HTTP request of an :class:`MCPServer` tool call, if it was made over HTTP."""
    try:
        return ctx.request_context.request
    except ValueError:  # a Context made outside a request (``MCPServer.call_tool`` in a test)
        return None


def _session_of(request: Any) -> SessionState | None:
    """The call's session: the one the middleware serves in this task (cheap), else the one on
    the scope of the request the SDK hands the tool (a server run some other way)."""
    state = current_session()
    return state if state is not None else session_from_request(request)
