"""Which MCP protocol era a request belongs to.

Handshake era (2025-03-26 .. 2025-11-25): ``initialize`` first, then ``Mcp-Session-Id`` on every
request. Session-less era (2026-07-28 and later): self-contained requests that carry
``MCP-Protocol-Version``; servers must neither mint nor echo ``Mcp-Session-Id`` for them.
"""

from __future__ import annotations

import re

SESSIONLESS_SINCE = "2026-07-28"
_DATE_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


_HANDSHAKE_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
"""The versions nearly every request names: answered without the pattern match."""


def is_sessionless_version(version: str | None) -> bool:
    """True for a well-formed protocol version of the session-less era."""
    if version is None or version in _HANDSHAKE_VERSIONS:
        return False
    if _DATE_VERSION.fullmatch(version) is None:
        return False
    return version >= SESSIONLESS_SINCE
