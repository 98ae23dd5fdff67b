"""Session record stores: in-memory (default) and Redis (extra ``[redis]``)."""

from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    Caps,
    CommitOutcome,
    CreateOutcome,
    SessionGone,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    UnconfirmedCommit,
)
from mcp2anp_middleware.sessions.stores.memory import InMemorySessionStore

__all__ = [
    "CapExceeded",
    "Caps",
    "CommitOutcome",
    "CreateOutcome",
    "InMemorySessionStore",
    "SessionGone",
    "SessionRecord",
    "SessionStore",
    "StoreUnavailable",
    "UnconfirmedCommit",
]
