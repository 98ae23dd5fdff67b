"""The whole stack for end-to-end tests: host app + demo ANP agent + ANPMiddleware on uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from example_app.demo_agent import (
    DemoIdentity,
    StaticDidResolver,
    create_demo_agent,
    create_demo_identity,
)
from mcp2anp_middleware import AuthenticationError, Credentials, SessionConfig, SessionState
from mcp2anp_middleware.anp_tools.url_policy import URLPolicy
from mcp2anp_middleware.hosting import ANPMiddleware

from .servers import free_port, serve

API_KEYS = {"key-alice-0123456789": "alice", "key-bob-9876543210": "bob"}


@dataclass
class Stack:
    base_url: str
    middleware: ANPMiddleware
    identities: dict[str, DemoIdentity]
    configs: dict[str, SessionConfig] = field(default_factory=dict)

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    @property
    def ad_url(self) -> str:
        return f"{self.base_url}/agent/ad.json"

    def sessions(self) -> list[SessionState]:
        """The live sessions of the middleware's registry (every session, with one process)."""
        return self.middleware.registry.live_sessions()

    @asynccontextmanager
    async def client(self, api_key: str | None, mode: str = "legacy") -> AsyncIterator[Client]:
        headers = {"X-API-Key": api_key} if api_key else {}
        async with httpx2.AsyncClient(headers=headers) as http:
            transport = streamable_http_client(self.mcp_url, http_client=http)
            async with Client(transport, mode=mode) as client:
                yield client


class KeyAuthenticator:
    def __init__(self, configs: dict[str, SessionConfig]) -> None:
        self.configs = configs
        self.calls = 0

    async def __call__(self, credentials: Credentials) -> SessionConfig:
        self.calls += 1
        key = credentials.api_key or credentials.bearer_token
        if key is None or key not in self.configs:
            raise AuthenticationError("unknown API key")
        return self.configs[key]


@asynccontextmanager
async def anp_stack(tmp_path: Path, **options: Any) -> AsyncIterator[Stack]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    identities = {
        name: create_demo_identity(tmp_path, name, port=port) for name in ("alice", "bob")
    }
    configs = {
        key: SessionConfig(
            principal=name,
            did_document_path=identities[name].did_document_path,
            private_key_path=identities[name].private_key_path,
        )
        for key, name in API_KEYS.items()
    }
    configs.update(options.pop("extra_configs", {}))
    resolver = StaticDidResolver({i.did: i.did_document for i in identities.values()})
    agent = create_demo_agent(base_url=f"{base_url}/agent", did_resolver=resolver)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host home")

    host = Starlette(routes=[Route("/", home), Mount("/agent", app=agent)])
    middleware = ANPMiddleware(
        host,
        authenticator=options.pop("authenticator", KeyAuthenticator(configs)),
        url_policy=options.pop("url_policy", URLPolicy(allow_private=True)),
        entry_url=f"{base_url}/agent/ad.json",
        **options,
    )
    async with serve(middleware, port=port):
        yield Stack(base_url, middleware, identities, configs)
