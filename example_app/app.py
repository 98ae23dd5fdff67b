"""The demo host: a Starlette app and the offline demo ANP agent, wrapped in ANPMiddleware."""

from __future__ import annotations

import copy
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from mcp2anp_middleware import (
    ANPMiddleware,
    CachingAuthenticator,
    RemoteVerifierAuthenticator,
    SessionConfig,
    StaticKeyAuthenticator,
    URLPolicy,
    frozen_startup_heap,
    session_from_request,
)
from mcp2anp_middleware.authentication.base import Authenticator
from mcp2anp_middleware.sessions.policy import RequestLimits, SessionPolicy
from mcp2anp_middleware.sessions.stores import SessionStore

from .demo_agent import LoopbackHttpDidResolver, create_demo_agent, is_loopback_did
from .settings import FETCH_DEADLINE, Settings


class _DemoResolver:
    """How the demo agent finds callers' DID documents: over HTTP for loopback DIDs, else a table.

    A loopback DID (the development DID, made for this launcher's address, or a keys file's
    ``did:wba:localhost%3A<port>:...``) is resolved for real: fetched from the address it names,
    where ANPMiddleware serves it. A DID of another host (a keys file's ``did:wba:example.com:...``)
    cannot be fetched without leaving the machine, so the demo takes it from the keys file.
    """

    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.http = LoopbackHttpDidResolver()
        self.documents = {did: doc for did, doc in documents.items() if not is_loopback_did(did)}

    async def __call__(self, did: str) -> dict[str, Any] | None:
        if is_loopback_did(did):
            return await self.http(did)
        document = self.documents.get(did)
        return copy.deepcopy(document) if document is not None else None


def _did_documents(configs: list[SessionConfig]) -> dict[str, dict[str, Any]]:
    """The DID documents of the configured API keys, for DIDs the demo cannot fetch."""
    documents = {}
    for config in configs:
        if config.did_document_path is not None:
            document = json.loads(config.did_document_path.read_text(encoding="utf-8"))
            documents[document["id"]] = document
    return documents


def build_url_policy(settings: Settings) -> URLPolicy:
    """Public addresses, plus the demo agent only, unless private ranges are allowed outright."""
    if settings.allow_private:
        return URLPolicy(allow_private=True, timeout=FETCH_DEADLINE)
    return URLPolicy(timeout=FETCH_DEADLINE, private_origins=(f"{settings.base_url}/agent/",))


def build_authenticator(
    settings: Settings, static_keys: StaticKeyAuthenticator | None = None
) -> Authenticator | None:
    """The authenticator of the auth mode; None for ``dev``: ANPMiddleware's development mode,
    which makes the DID for ``public_url`` and serves its document."""
    if settings.auth_mode == "static":
        assert settings.api_keys_file is not None
        keys = static_keys or StaticKeyAuthenticator.from_file(settings.api_keys_file)
        return CachingAuthenticator(keys)
    if settings.auth_mode == "remote":
        assert settings.auth_url is not None
        return CachingAuthenticator(RemoteVerifierAuthenticator(settings.auth_url))
    if settings.auth_mode != "dev":
        raise ValueError(f"unknown auth mode {settings.auth_mode!r}")
    return None


async def index(request: Request) -> JSONResponse:
    state = session_from_request(request)
    return JSONResponse(
        {
            "service": "mcp2anp-middleware demo",
            "mcp_endpoint": str(request.url_for("index")).rstrip("/") + "/mcp",
            "demo_agent": str(request.base_url) + "agent/ad.json",
            "session": state.session_id[:8] + "…" if state else None,
        }
    )


def create_app(settings: Settings) -> ANPMiddleware:
    base_url = settings.base_url
    static_keys = None
    if settings.auth_mode == "static" and settings.api_keys_file is not None:
        static_keys = StaticKeyAuthenticator.from_file(settings.api_keys_file)
    known = _did_documents(static_keys.configs if static_keys else [])
    agent = create_demo_agent(
        base_url=f"{base_url}/agent",
        did_resolver=_DemoResolver(known),
    )
    host = Starlette(routes=[Route("/", index, name="index"), Mount("/agent", app=agent)])
    return ANPMiddleware(
        host,
        # The server's process is ours: its startup objects are kept out of full collections.
        services=[frozen_startup_heap],
        authenticator=build_authenticator(settings, static_keys),
        data_dir=settings.data_dir,
        public_url=base_url,
        url_policy=build_url_policy(settings),
        entry_url=settings.entry_url or f"{base_url}/agent/ad.json",
        policy=SessionPolicy(
            timeout=settings.session_timeout,
            cleanup_interval=settings.cleanup_interval,
            max_age=settings.max_session_age,
            per_principal_cap=settings.per_principal_cap,
            global_cap=settings.global_cap,
            cap_policy="evict_oldest" if settings.cap_policy == "evict_oldest" else "reject",
        ),
        store=build_store(settings),
        stats_path=settings.stats_path,
        stats_token=settings.stats_token,
        admin_token=settings.admin_token,
        state_file=settings.state_file,
        limits=RequestLimits(
            allowed_origins=settings.allowed_origins, body_timeout=settings.body_timeout
        ),
        shutdown_grace=settings.shutdown_grace,
    )


def build_store(settings: Settings) -> SessionStore | None:
    if settings.store_url == "memory://":
        return None
    from mcp2anp_middleware.sessions.stores.redis import RedisSessionStore

    if settings.touch_interval is None:
        return RedisSessionStore.from_url(settings.store_url)
    return RedisSessionStore.from_url(settings.store_url, touch_interval=settings.touch_interval)
