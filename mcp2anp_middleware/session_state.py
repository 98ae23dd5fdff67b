"""Per-session state: who the session belongs to, its credentials, and its idle clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clock import Clock, system_clock
from .session_ids import short_id

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


class SessionState:
    """One MCP session.

    ``last_accessed`` moves on every request that uses the session, at its start and at its end,
    so idle time counts from the end of the last request. While ``in_flight`` is non-zero the
    session is never expired. ``anp_crawler`` / ``anp_handler`` are filled lazily on the first tool
    call so idle sessions stay small.
    """

    __slots__ = (
        "__weakref__",
        "_clock",
        "anp_crawler",
        "anp_handler",
        "closed",
        "config",
        "created_at",
        "implicit",
        "in_flight",
        "last_accessed",
        "reserved",
        "session_id",
        "synced_at",
    )

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        *,
        clock: Clock = system_clock,
        implicit: bool = False,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self._clock = clock
        now = clock()
        self.created_at = now
        self.last_accessed = now
        self.synced_at = now
        self.anp_crawler: Any = None
        self.anp_handler: Any = None
        self.in_flight = 0
        self.implicit = implicit
        self.closed = False
        self.reserved = False

    @property
    def principal(self) -> str:
        return self.config.principal

    def touch(self) -> None:
        """Record use of the session now."""
        self.last_accessed = self._clock()

    def idle_seconds(self) -> float:
        return self._clock() - self.last_accessed

    def is_expired(self, timeout: float) -> bool:
        """True when idle longer than ``timeout`` seconds and no request is using the session."""
        return self.in_flight == 0 and self.idle_seconds() > timeout

    def __repr__(self) -> str:
        return (
            f"SessionState(session_id={short_id(self.session_id)!r}, "
            f"principal={self.principal!r}, in_flight={self.in_flight})"
        )
