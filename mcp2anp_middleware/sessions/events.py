"""Session lifecycle events: what happened to a session, for machinery, audit logs and metrics.

The registry emits one :class:`SessionEvent` per change, synchronously, to every subscriber in the
process that holds the session's live object; ``state`` is that object when this process has it.
Per-session machinery (the ANP tools' crawler, an MCP transport) is released by subscribers to the
ending kinds rather than by the registry, which knows nothing of what hangs on a session.

With a shared store each process emits what it sees: the process that removes a session (DELETE,
revocation, eviction) emits it and announces it through the store, and every other process that
holds a live object for it then emits the same kind for its own object. Expiry is emitted by each
process whose sweep or lookup finds a session it holds past its deadline.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mcp2anp_middleware.logging_setup import HotPathLogger, exception_fields
from mcp2anp_middleware.sessions.ids import short_id

if TYPE_CHECKING:
    from mcp2anp_middleware.sessions.state import SessionState

logger = HotPathLogger("mcp2anp_middleware.sessions")  # per-session lines: bound once


class SessionEventKind(enum.StrEnum):
    CREATED = "created"
    """A session was committed: its creating request was served."""
    EXPIRED = "expired"
    """Idle past the timeout, or older than the maximum age."""
    EVICTED = "evicted"
    """Removed to make room for a newer session of its principal (cap with eviction)."""
    DELETED = "deleted"
    """The client closed it (HTTP DELETE)."""
    REVOKED = "revoked"
    """An operator revoked it (admin API or :meth:`SessionRegistry.revoke`)."""
    CLOSED = "closed"
    """This process shut down; the session itself lives on in a shared store."""

    @property
    def ends_session(self) -> bool:
        return self is not SessionEventKind.CREATED


@dataclass(frozen=True, slots=True)
class SessionEvent:
    kind: SessionEventKind
    session_id: str
    """The whole id: a secret. Log :attr:`short_id`, never this."""
    principal: str
    implicit: bool
    state: SessionState | None
    """The live object in this process, when it holds one."""

    @property
    def short_id(self) -> str:
        return short_id(self.session_id)


SessionListener = Callable[[SessionEvent], None]


class SessionEvents:
    """Subscribers of one registry; a failing subscriber is logged and never stops the others."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[SessionListener] = []

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def subscribe(self, listener: SessionListener) -> Callable[[], None]:
        """Call ``listener`` for every event from now on; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, event: SessionEvent) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                failed = exception_fields()
                logger.error("Session event listener failed", kind=str(event.kind), **failed)
