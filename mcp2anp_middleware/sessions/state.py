"""A session's live object in this process: who it belongs to, its times, what hangs on it."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp2anp_middleware.sessions.ids import short_id

ANONYMOUS_PRINCIPAL = "anonymous"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The credentials a session signs its ANP requests with, and the principal it belongs to.

    Credentials are given either as file paths or inline (``did_document`` as JSON text,
    ``private_key_pem`` as PEM text). ``principal`` is the stable identity of whoever
    authenticated; a session may only ever be used by the principal that created it.
    """

    principal: str = ANONYMOUS_PRINCIPAL
    did_document_path: Path | None = None
    private_key_path: Path | None = None
    did_document: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    _hash: int = field(default=0, init=False, repr=False, compare=False)
    """The hash, computed once: a config is looked up (credential cache) and compared (the
    session's own) on every request, and hashing two paths and two texts each time adds up."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(self._values()))

    def _values(self) -> tuple[Any, ...]:
        return (
            self.principal,
            self.did_document_path,
            self.private_key_path,
            self.did_document,
            self.private_key_pem,
        )

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        # The same object on nearly every request (an authenticator hands out its cached one).
        if self is other:
            return True
        if not isinstance(other, SessionConfig):
            return NotImplemented
        return self._hash == other._hash and self._values() == other._values()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Rebuilt through __init__ (pickle, copy): a string's hash differs between processes.
        return (SessionConfig, self._values())


SERVING: ContextVar[Callable[[], SessionState | None]] = ContextVar(
    "mcp2anp_serving", default=lambda: None
)
"""The session of the request this task serves (a weak reference: call it): set by the
middleware around the app, so code the request runs (a tool, however deep in the SDK) finds its
session without the request. Weak, because a task or timer started during a request (a pooled
connection's, say) keeps that request's context as long as it lives."""

NEVER = -math.inf
"""``confirmed_at`` of a session the store has not confirmed yet, and ``synced_at`` of one whose
record does not hold everything yet (one float for all)."""


class SessionState:
    """One session as this process holds it (``request.state.mcp_session`` in the app).

    The times mirror the store's record: ``last_accessed`` moves at the start and the end of every
    request, so idle time counts from the end of the last one, and the registry writes it back
    (``synced_at``) at most once per touch interval (at once when ``synced_at`` is ``NEVER``).
    ``in_flight`` counts requests using the session; while it is non-zero the session never
    expires. ``attachments`` holds per-session
    machinery keyed by its owner (the ANP tools' handler, later an MCP transport), created lazily so
    idle sessions stay small, and released by the owner when a session event says it ended.
    """

    __slots__ = (
        "__weakref__",
        "attachments",
        "closed",
        "config",
        "confirmed_at",
        "created_at",
        "handshake",
        "implicit",
        "in_flight",
        "last_accessed",
        "session_id",
        "store_mark",
        "synced_at",
    )

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        *,
        created_at: float,
        last_accessed: float | None = None,
        implicit: bool = False,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.created_at = created_at
        self.last_accessed = created_at if last_accessed is None else last_accessed
        self.synced_at = self.last_accessed
        self.attachments: dict[str, Any] | None = None
        self.in_flight = 0
        self.implicit = implicit
        self.closed = False
        self.store_mark: str | None = None
        self.confirmed_at = NEVER
        """When the store last confirmed the session (a read found it, or it took a write): a
        shared store whose ends this process follows is not asked again for ``recheck`` s."""
        self.handshake: str | None = None
        """The MCP handshake (compact JSON) once ``initialize`` is done; kept in the store so any
        process serves the session initialized. Interned: sessions of one client share it."""
        """How the store's record was last written, when not plainly: ``"reserved"`` (a short
        reservation only a commit extends) or ``"leased"`` (while a request ran, with a lease
        rather than the idle deadline: the end of the last request writes it again). One slot
        for both, since they never hold at once: idle sessions stay small."""

    @property
    def principal(self) -> str:
        return self.config.principal

    @property
    def reserved(self) -> bool:
        return self.store_mark == "reserved"

    @reserved.setter
    def reserved(self, value: bool) -> None:
        self.store_mark = "reserved" if value else None

    @property
    def leased(self) -> bool:
        return self.store_mark == "leased"

    @leased.setter
    def leased(self, value: bool) -> None:
        self.store_mark = "leased" if value else None

    def attachment(self, key: str) -> Any:
        """The machinery attached under ``key``, or None."""
        return None if self.attachments is None else self.attachments.get(key)

    def attach(self, key: str, value: Any) -> None:
        if self.attachments is None:
            self.attachments = {}
        self.attachments[key] = value

    def detach(self, key: str) -> Any:
        """Remove and return the machinery under ``key`` (None if there was none)."""
        return None if self.attachments is None else self.attachments.pop(key, None)

    def __repr__(self) -> str:
        return (
            f"SessionState(session_id={short_id(self.session_id)!r}, "
            f"principal={self.principal!r}, in_flight={self.in_flight})"
        )
