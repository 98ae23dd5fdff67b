"""Session-less request state (MCP 2026-07-28) that every worker can unseal, bound to the caller.

A multi-round-trip request answers ``InputRequiredResult`` with a sealed ``requestState``; the
client retries with it, maybe on another worker. The SDK seals under a key made per process by
default, so the retry fails on any other worker. Here the server's request-state policy is
replaced (keeping its TTL and audience) by one whose keys come from the backplane: generated once
and kept in the shared store, rotated there, staged before use so every worker can unseal with a
key before any worker seals with it. An operator may pass fixed keys instead.

The SDK binds state to the principal of its own auth context, which a host using this package's
authentication does not set; the binding here is the principal the middleware authenticated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import (
    AESGCMRequestStateCodec,
    RequestStateBoundary,
    RequestStateSecurity,
    authenticated_principal,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from mcp2anp_middleware.mcp_hosting.backplane import Backplane

logger = logging.getLogger("mcp2anp_middleware.mcp_hosting")

REFRESH_SECONDS = 60.0
"""How often a worker rereads the shared key ring (a new key is staged two refreshes ahead)."""


class RingCodec:
    """The SDK's AES-GCM codec over a key ring that can change while serving."""

    def __init__(self, keys: Sequence[bytes | str]) -> None:
        self.keys = list(keys)
        self._codec = AESGCMRequestStateCodec(self.keys)

    def replace(self, keys: Sequence[bytes | str]) -> None:
        if list(keys) != self.keys:
            self.keys = list(keys)
            self._codec = AESGCMRequestStateCodec(self.keys)

    def seal(self, payload: bytes) -> str:
        return self._codec.seal(payload)

    def unseal(self, token: str) -> bytes:
        return self._codec.unseal(token)


def middleware_principal(ctx: Any) -> str | None:
    """The principal this package's middleware authenticated for the request (else the SDK's)."""
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None)
    state = scope.get("state", {}).get("mcp_session") if isinstance(scope, dict) else None
    principal = getattr(state, "principal", None)
    if isinstance(principal, str):
        return "mcp2anp:" + principal
    return authenticated_principal(ctx)


class SharedRequestState:
    """The server's request-state policy, with keys every worker shares (``keys``, else the
    backplane's ring) and bound to the middleware's principal. A codec of the host's own (not the
    SDK's AES-GCM one: a KMS, say) is kept unless ``keys`` are given; its ``ttl`` and
    ``audience`` are kept in any case."""

    def __init__(self, server: MCPServer, *, keys: Sequence[bytes | str] | None = None) -> None:
        boundary = next(
            (m for m in server._lowlevel_server.middleware if isinstance(m, RequestStateBoundary)),
            None,
        )
        if boundary is None:
            raise ValueError("this MCPServer has no request-state boundary to share keys with")
        current: RequestStateSecurity = boundary._security
        own_codec = keys is None and not isinstance(
            current.codec,
            AESGCMRequestStateCodec | RingCodec,  # (another endpoint's ring)
        )
        self.fixed = keys is not None or own_codec
        """Nothing to load from the backplane: the keys given, or the host's own codec."""
        self.codec = RingCodec(list(keys) if keys is not None else [_placeholder()])
        boundary._security = RequestStateSecurity(
            codec=current.codec if own_codec else self.codec,
            ttl=current.ttl,
            bind_principal=middleware_principal,
            audience=current.audience,
        )

    async def start(self, backplane: Backplane, tasks: TaskGroup) -> None:
        if self.fixed:
            return
        try:
            self.codec.replace(await backplane.request_state_keys())
        except Exception:  # the store is down: serve on a key of our own until it is back
            logger.warning("Request-state keys not loaded (store unavailable); retrying")
        tasks.start_soon(self._refresh, backplane)

    async def _refresh(self, backplane: Backplane) -> None:
        while True:
            await anyio.sleep(REFRESH_SECONDS)
            try:
                self.codec.replace(await backplane.request_state_keys())
            except Exception:
                logger.warning("Request-state keys not refreshed (store unavailable); keeping them")


def _placeholder() -> bytes:
    import os

    return os.urandom(32)
