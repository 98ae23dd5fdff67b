"""The two ANP tools, ``anp_fetchDoc`` and ``anp_invokeOpenRPC``, bound to each MCP session.

Each session signs with its own DID: the tool finds the session's :class:`SessionState` in the
request scope and uses its ``anp_crawler`` (the session's signer and document cache) and
``anp_handler`` (this module's :class:`ANPToolHandler`). Both are created on the session's first
tool call, so idle sessions stay small; creation has no ``await`` in it, so concurrent first calls
cannot create two. Failures are returned as tool errors (``isError: true``) with a stable code.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from .anp_documents import analyse_document
from .anp_errors import ANPToolError
from .anp_http import ANPHttpClient
from .anp_signing import SessionSigner
from .clock import Clock, system_clock
from .did_credentials import CredentialCache, CredentialError
from .middleware import SESSION_SCOPE_KEY
from .session_state import SessionState
from .url_policy import URLPolicy

logger = structlog.get_logger("mcp2anp_middleware.tools")

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


class SessionCrawler:
    """Per-session ANP client state: the signer (with agent-issued tokens) and a document cache."""

    __slots__ = ("_cache", "cache_size", "cache_ttl", "clock", "signer")

    def __init__(
        self, signer: SessionSigner, *, cache_ttl: float, cache_size: int, clock: Clock
    ) -> None:
        self.signer = signer
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] | None = None

    def cached(self, url: str) -> dict[str, Any] | None:
        if self._cache is None:
            return None
        entry = self._cache.get(url)
        if entry is None or self.clock() - entry[0] > self.cache_ttl:
            return None
        return entry[1]

    def remember(self, url: str, result: dict[str, Any]) -> None:
        if self.cache_size <= 0:
            return
        if self._cache is None:
            self._cache = OrderedDict()
        self._cache[url] = (self.clock(), result)
        self._cache.move_to_end(url)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


class ANPToolHandler:
    """Implements the two tools for one session."""

    __slots__ = ("crawler", "http")

    def __init__(self, crawler: SessionCrawler, http: ANPHttpClient) -> None:
        self.crawler = crawler
        self.http = http

    async def fetch_doc(self, url: str) -> dict[str, Any]:
        cached = self.crawler.cached(url)
        if cached is not None:
            return {**cached, "cached": True}
        result = await self.http.request(self.crawler.signer, "GET", url)
        if not 200 <= result.status < 300:
            raise ANPToolError(
                "HTTP_ERROR",
                f"{url} answered HTTP {result.status}",
                status=result.status,
                url=result.url,
                body=result.text()[:500],
            )
        document: Any
        try:
            document = result.json()
            is_json = True
        except ValueError:
            document, is_json = result.text(), False
        links, methods = analyse_document(result.url, document) if is_json else ([], [])
        payload = {
            "url": result.url,
            "status": result.status,
            "content_type": result.content_type,
            "document": document,
            "links": links,
            "methods": methods,
        }
        self.crawler.remember(url, payload)
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
        clock: Clock = system_clock,
    ) -> None:
        self.url_policy = url_policy if url_policy is not None else URLPolicy()
        self.entry_url = entry_url
        self.credentials = credentials if credentials is not None else CredentialCache()
        self.http = http_client if http_client is not None else ANPHttpClient(self.url_policy)
        self.document_cache_ttl = document_cache_ttl
        self.document_cache_size = document_cache_size
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
        """The session's handler, created on first use (no await: exactly once per session)."""
        handler = state.anp_handler
        if isinstance(handler, ANPToolHandler):
            return handler
        credential = self.credentials.get(state.config)
        crawler = SessionCrawler(
            SessionSigner(credential),
            cache_ttl=self.document_cache_ttl,
            cache_size=self.document_cache_size,
            clock=self.clock,
        )
        handler = ANPToolHandler(crawler, self.http)
        state.anp_crawler = crawler
        state.anp_handler = handler
        return handler

    @asynccontextmanager
    async def service(self) -> AsyncIterator[None]:
        """Keeps the pooled HTTP client for the server's lifetime and closes it at shutdown."""
        try:
            yield
        finally:
            await self.http.aclose()

    def register(self, server: MCPServer) -> None:
        toolkit = self

        async def anp_fetchDoc(
            url: Annotated[
                str,
                Field(description="Absolute http(s) URL of the ANP document to fetch."),
            ],
            ctx: Context,
        ) -> CallToolResult:
            return await toolkit._run(ctx, "anp_fetchDoc", lambda h: h.fetch_doc(url), url=url)

        async def anp_invokeOpenRPC(
            endpoint: Annotated[
                str, Field(description="JSON-RPC endpoint URL (an OpenRPC 'servers' URL).")
            ],
            method: Annotated[str, Field(description="Name of the method to call.")],
            ctx: Context,
            params: Annotated[
                dict[str, Any] | list[Any] | None,
                Field(description="Method parameters: an object (by name) or an array."),
            ] = None,
            request_id: Annotated[
                str | int | None,
                Field(description="JSON-RPC id to send; generated when omitted."),
            ] = None,
        ) -> CallToolResult:
            return await toolkit._run(
                ctx,
                "anp_invokeOpenRPC",
                lambda h: h.invoke_openrpc(endpoint, method, params, request_id),
                url=endpoint,
                method=method,
            )

        server.add_tool(anp_fetchDoc, name="anp_fetchDoc", description=FETCH_DOC_DESCRIPTION)
        server.add_tool(anp_invokeOpenRPC, name="anp_invokeOpenRPC", description=INVOKE_DESCRIPTION)

    async def _run(self, ctx: Context, tool: str, call: Any, **log_fields: Any) -> CallToolResult:
        state = _session_of(ctx)
        try:
            if state is None:
                raise ANPToolError("CREDENTIAL_ERROR", "no MCP session is attached to this call")
            try:
                handler = self.handler_for(state)
            except CredentialError as exc:
                raise ANPToolError("CREDENTIAL_ERROR", str(exc)) from None
            try:
                payload = await call(handler)
            except ANPToolError:
                raise
            except Exception as exc:  # a bug or a library surprise: still a tool error, no 500
                logger.exception("ANP tool crashed", tool=tool)
                raise ANPToolError(
                    "INTERNAL_ERROR", f"the tool failed unexpectedly ({type(exc).__name__})"
                ) from None
        except ANPToolError as exc:
            logger.info("ANP tool failed", tool=tool, code=exc.code, **log_fields)
            body = exc.to_payload()
            return CallToolResult(
                content=[TextContent(type="text", text=json.dumps(body, ensure_ascii=False))],
                structured_content=body,
                is_error=True,
            )
        logger.debug("ANP tool succeeded", tool=tool, **log_fields)
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(payload, ensure_ascii=False))],
            structured_content=payload,
        )


def _session_of(ctx: Context) -> SessionState | None:
    request = ctx.request_context.request
    if request is None:
        return None
    state = request.scope.get("state", {}).get(SESSION_SCOPE_KEY)
    return state if isinstance(state, SessionState) else None
