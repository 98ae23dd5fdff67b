"""Session id minting and validation.

Ids are 256 bits from :mod:`secrets`, URL-safe base64 (43 visible ASCII characters). Incoming ids
are checked against the MCP spec's alphabet (visible ASCII, 0x21-0x7E) and a length bound before
any store is consulted, so garbage never costs a lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets

SESSION_ID_BYTES = 32
MAX_SESSION_ID_LENGTH = 128
_VALID_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_ID_LENGTH}}}")


def new_session_id() -> str:
    """Return a fresh, unguessable session id (256 bits of entropy)."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def is_well_formed_session_id(value: str) -> bool:
    """True when ``value`` is visible ASCII and at most :data:`MAX_SESSION_ID_LENGTH` long."""
    return _VALID_ID.fullmatch(value) is not None


def short_id(session_id: str) -> str:
    """The form of a session id that may appear in logs: a prefix, never the whole secret."""
    return session_id[:8] + "…"


def implicit_session_id(principal: str) -> str:
    """The id of a principal's session-less-era session; internal, never sent on the wire."""
    return "implicit-" + hashlib.sha256(principal.encode()).hexdigest()[:40]
