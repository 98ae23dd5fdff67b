"""One-line hosting of the ANP tools: :class:`ANPMiddleware` wraps any ASGI app.

It is :class:`MCPSessionMiddleware` with the MCP endpoint already built: the official SDK's
``MCPServer`` in stateless mode with ``anp_fetchDoc`` and ``anp_invokeOpenRPC`` registered (on the
host's own server if it passes one), the SDK's session manager and the pooled ANP HTTP client run as
middleware services, and every credential checked (DID document and key) before a session uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp

from mcp2anp_middleware.anp_tools.credentials import CredentialCache, CredentialError
from mcp2anp_middleware.anp_tools.dev_identity import (
    DEFAULT_DATA_DIR,
    dev_did_address,
    ensure_dev_identity,
)
from mcp2anp_middleware.anp_tools.did_hosting import (
    DidDocumentApp,
    did_wba_location,
    served_documents,
)
from mcp2anp_middleware.anp_tools.toolkit import ANPToolkit
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.authentication.authenticators import (
    CachingAuthenticator,
    NoAuthAuthenticator,
    StaticKeyAuthenticator,
)
from mcp2anp_middleware.authentication.base import (
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
)
from mcp2anp_middleware.logging_setup import tame_anp_logging
from mcp2anp_middleware.mcp_hosting.endpoint import MCPEndpoint
from mcp2anp_middleware.sessions.background import Service
from mcp2anp_middleware.sessions.middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.state import SessionConfig
from mcp2anp_middleware.version import __version__

logger = structlog.get_logger("mcp2anp_middleware.hosting")


class CredentialCheckingAuthenticator:
    """Runs ``inner``, then makes sure the returned DID credential is usable (cached per config)."""

    def __init__(self, inner: Authenticator, credentials: CredentialCache) -> None:
        self.inner = inner
        self.credentials = credentials

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        config = await self.inner(credentials)
        if self.credentials.peek(config) is None:
            try:
                await asyncio.to_thread(self.credentials.get, config)
            except CredentialError as exc:
                logger.error(
                    "Session credential rejected", principal=config.principal, reason=str(exc)
                )
                raise
        return config


def held_configs(authenticator: object) -> list[SessionConfig]:
    """The configs an authenticator shipped with this package is known to hand out.

    Static ones only: :class:`StaticKeyAuthenticator`, :class:`StaticConfigAuthenticator`,
    :class:`NoAuthAuthenticator`, and those behind a :class:`CachingAuthenticator`. A remote
    verifier's or a custom authenticator's identities cannot be listed in advance: pass their
    documents as ``ANPMiddleware(did_documents=...)`` or publish them elsewhere.
    """
    if isinstance(authenticator, CachingAuthenticator):
        return held_configs(authenticator.inner)
    if isinstance(authenticator, StaticKeyAuthenticator):
        return authenticator.configs
    if isinstance(authenticator, StaticConfigAuthenticator | NoAuthAuthenticator):
        return [authenticator.config]
    return []


def _did_address(public_url: str | None, *, strict: bool) -> tuple[str, int | None] | None:
    """The did:wba address ``public_url`` stands for. In development mode (``strict``) a URL no
    DID can name is an error; otherwise it only feeds a diagnostic, and a server may well be
    public at an IP address or under a path while its DIDs are published elsewhere."""
    if public_url is None:
        return None
    try:
        return dev_did_address(public_url)
    except ValueError:
        if strict:
            raise
        return None


class ANPMiddleware(MCPSessionMiddleware):
    """Host the ANP tools for MCP clients under ``path_prefix`` (default ``/mcp``) of ``app``.

    Without an ``authenticator`` it runs in development mode: no authentication, and every session
    signs with a DID generated into ``data_dir`` for the address in ``public_url`` (the origin
    agents reach this app at, e.g. ``http://127.0.0.1:8000``), replacing one made for another
    address. Without ``public_url`` the identity already in ``data_dir`` is used whatever address
    it names, and a new one names ``localhost`` without a port, which no agent can resolve.

    With ``serve_did_documents`` (default on) the DID documents of the identities it signs with,
    the development DID and those of the shipped static authenticators (plus ``did_documents``),
    are served at the paths did:wba resolution fetches (``/<path>/did.json``,
    ``/.well-known/did.json``): see :mod:`mcp2anp_middleware.anp_tools.did_hosting`.

    MCP sessions are full sessions on every worker (handshake kept in the store, SSE responses,
    server→client requests, GET streams, resumption from any worker): ``json_response``,
    ``resumable``, ``retry_ms``, ``request_state_keys``, ``share_request_state`` and
    ``warm_seconds`` are the options of
    :class:`~mcp2anp_middleware.mcp_hosting.endpoint.MCPEndpoint`.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        server: MCPServer | None = None,
        authenticator: Authenticator | None = None,
        url_policy: URLPolicy | None = None,
        entry_url: str | None = None,
        data_dir: Path | str = DEFAULT_DATA_DIR,
        json_response: bool = False,
        resumable: bool = True,
        retry_ms: int | None = 1000,
        request_state_keys: Sequence[bytes | str] | None = None,
        share_request_state: bool = True,
        warm_seconds: float = 5.0,
        toolkit: ANPToolkit | None = None,
        services: Sequence[Service] = (),
        public_url: str | None = None,
        serve_did_documents: bool = True,
        did_documents: Sequence[Mapping[str, Any]] = (),
        **session_options: Any,
    ) -> None:
        tame_anp_logging()
        address = _did_address(public_url, strict=authenticator is None)
        clock = session_options.get("clock")
        self.toolkit = (
            toolkit
            if toolkit is not None
            else ANPToolkit(
                url_policy=url_policy, entry_url=entry_url, **({"clock": clock} if clock else {})
            )
        )
        # Drain on shutdown for longer than a tool call may take, so calls in flight can finish.
        session_options.setdefault("shutdown_grace", self.toolkit.url_policy.timeout + 5.0)
        if server is None:
            server = MCPServer(
                "mcp2anp", version=__version__, instructions=self.toolkit.instructions()
            )
        self.toolkit.register(server)
        self.mcp_server = server
        self.endpoint = MCPEndpoint(
            server,
            json_response=json_response,
            resumable=resumable,
            retry_ms=retry_ms,
            request_state_keys=request_state_keys,
            share_request_state=share_request_state,
            warm_seconds=warm_seconds,
        )
        documents: list[dict[str, Any]] = []
        if authenticator is None:
            hostname, port = address if address is not None else (None, None)
            dev = ensure_dev_identity(data_dir, hostname=hostname, port=port)
            documents = self._preload_dev_document(dev)
            logger.warning(
                "Development mode: no authentication; all sessions share a local DID",
                data_dir=str(data_dir),
                did=documents[0]["id"] if documents else None,
            )
            authenticator = StaticConfigAuthenticator(dev)
        elif serve_did_documents:
            documents = served_documents(held_configs(authenticator))
        super().__init__(
            app,
            mcp_app=self.endpoint,
            authenticator=CredentialCheckingAuthenticator(authenticator, self.toolkit.credentials),
            services=[self.endpoint.service, self.toolkit.service, *services],
            **session_options,
        )
        self.registry.subscribe(self.toolkit.release)
        self.did_app = DidDocumentApp()
        """The DID documents served from this app (empty with ``serve_did_documents=False``)."""
        if serve_did_documents:
            self._serve_did_documents([*documents, *did_documents], address)

    def _preload_dev_document(self, dev: SessionConfig) -> list[dict[str, Any]]:
        """Load the development credential now and return its document to serve.

        The document served and the key sessions sign with then come from one reading of the
        files, so a server started later on another address (which replaces the files in a
        shared data directory) cannot make this one serve one key and sign with another.
        """
        try:
            credential = self.toolkit.credentials.get(dev)
        except CredentialError as exc:  # answered 401 per session, as for any bad credential
            logger.error("Development DID unusable", reason=str(exc))
            return []
        return [credential.document]

    def _serve_did_documents(
        self, documents: Sequence[Mapping[str, Any]], address: tuple[str, int | None] | None
    ) -> None:
        """Route each document's did:wba path to :attr:`did_app` (a side app by exact path).

        A path the middleware already routes (the MCP prefix, statistics, administration) keeps
        its route, and a document that cannot be served is skipped: both are logged, neither
        stops the server (sessions signing with such a DID fail where the agent resolves it).
        """
        for document in documents:
            try:
                path = did_wba_location(str(document.get("id"))).path
                taken = self._side_apps.get(path)
                if (
                    path == self.path_prefix
                    or path.startswith(self._prefix_slash)
                    or (taken is not None and taken is not self.did_app)
                ):
                    raise ValueError(f"its path {path} is already routed by the middleware")
                location = self.did_app.add(document)
            except ValueError as exc:
                logger.warning("DID document not served", did=document.get("id"), reason=str(exc))
                continue
            self._side_apps[path] = self.did_app
            logger.info("Serving DID document", did=location.did, path=path)
            if address is not None:
                host, port = address
                expected = host if port is None else f"{host}:{port}"
                if location.authority.lower() != expected:
                    logger.warning(
                        "Served DID names another address than public_url: resolvers will not "
                        "look for it here",
                        did=location.did,
                        public_url_address=expected,
                    )
