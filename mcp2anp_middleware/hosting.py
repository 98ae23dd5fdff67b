"""One-line hosting of the ANP tools: :class:`ANPMiddleware` wraps any ASGI app.

It is :class:`MCPSessionMiddleware` with the MCP endpoint already built: the official SDK's
``MCPServer`` in stateless mode with ``anp_fetchDoc`` and ``anp_invokeOpenRPC`` registered (on the
host's own server if it passes one), the SDK's session manager and the pooled ANP HTTP client run as
middleware services, and every credential checked (DID document and key) before a session uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp

from mcp2anp_middleware.anp_tools.credentials import CredentialCache, CredentialError
from mcp2anp_middleware.anp_tools.dev_identity import DEFAULT_DATA_DIR, ensure_dev_identity
from mcp2anp_middleware.anp_tools.toolkit import ANPToolkit
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.authentication.base import (
    Authenticator,
    Credentials,
    StaticConfigAuthenticator,
)
from mcp2anp_middleware.logging_setup import tame_anp_logging
from mcp2anp_middleware.mcp_endpoint import MCPEndpoint
from mcp2anp_middleware.sessions.background import Service
from mcp2anp_middleware.sessions.middleware import MCPSessionMiddleware
from mcp2anp_middleware.sessions.state import SessionConfig

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


class ANPMiddleware(MCPSessionMiddleware):
    """Host the ANP tools for MCP clients under ``path_prefix`` (default ``/mcp``) of ``app``.

    Without an ``authenticator`` it runs in development mode: no authentication, and every session
    signs with a DID generated on first run into ``data_dir``.
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
        json_response: bool = True,
        toolkit: ANPToolkit | None = None,
        services: Sequence[Service] = (),
        **session_options: Any,
    ) -> None:
        tame_anp_logging()
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
            server = MCPServer("mcp2anp", instructions=self.toolkit.instructions())
        self.toolkit.register(server)
        self.mcp_server = server
        self.endpoint = MCPEndpoint(server, json_response=json_response)
        if authenticator is None:
            logger.warning(
                "Development mode: no authentication; all sessions share a local DID",
                data_dir=str(data_dir),
            )
            authenticator = StaticConfigAuthenticator(ensure_dev_identity(data_dir))
        super().__init__(
            app,
            mcp_app=self.endpoint,
            authenticator=CredentialCheckingAuthenticator(authenticator, self.toolkit.credentials),
            services=[self.endpoint.service, self.toolkit.service, *services],
            **session_options,
        )
        self.registry.subscribe(self.toolkit.release)
