"""Which MCP protocol era a request belongs to.

Handshake era (2025-03-26 .. 2025-11-25): ``initialize`` first, then ``Mcp-Session-Id`` on every
request. Session-less era (2026-07-28 and later): self-contained requests that carry
``MCP-Protocol-Version``; servers must neither mint nor echo ``Mcp-Session-Id`` for them.
"""

from __future__ import annotations

import re
from functools import lru_cache

SESSIONLESS_SINCE = "2026-07-28"
_DATE_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


@lru_cache(maxsize=32)  # every request asks, with one of a handful of versions
def is_sessionless_version(version: str | None) -> bool:
    """True for a well-formed protocol version of the session-less era."""
    if version is None or _DATE_VERSION.fullmatch(version) is None:
        return False
    return version >= SESSIONLESS_SINCE
