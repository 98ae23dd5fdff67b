"""Session record stores: in-memory (default) and Redis (extra ``[redis]``)."""

from .base import (
    CapExceeded,
    Caps,
    CreateOutcome,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
)
from .memory import InMemorySessionStore

__all__ = [
    "CapExceeded",
    "Caps",
    "CreateOutcome",
    "InMemorySessionStore",
    "SessionRecord",
    "SessionStore",
    "StoreUnavailable",
]
