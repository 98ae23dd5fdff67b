"""Origin validation (DNS-rebinding protection), as the MCP transport spec requires.

Requests without ``Origin`` (non-browser clients) pass. A browser request's ``Origin`` must be in
``allowed_origins``; by default only loopback origins (any port) are allowed, which suits a server
bound to 127.0.0.1. ``["*"]`` turns the check off.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class OriginPolicy:
    def __init__(self, allowed_origins: Sequence[str] | None = None) -> None:
        self.allow_all = allowed_origins is not None and "*" in allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins or ()}
        self.loopback_default = allowed_origins is None

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.allow_all:
            return True
        normalized = origin.rstrip("/").lower()
        if normalized in self.allowed:
            return True
        if self.loopback_default:
            try:
                parts = urlsplit(normalized)
            except ValueError:
                return False
            return parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK
        return False
