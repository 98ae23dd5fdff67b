"""The narrow store interface for session METADATA.

A store keeps who a session belongs to and its times; nothing secret. Live objects (the session's
signer, document cache, tool handler) stay in each process and are rebuilt from the metadata when a
session reaches a process that has not seen it; its credential comes from the request's own
(re-)authentication, so no key material is ever written to a shared store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol


class StoreUnavailable(Exception):
    """The store cannot be reached; requests are answered 503 until it is back."""


class CapExceeded(Exception):
    """A session cap refused a new session: ``scope`` is "principal" (429) or "global" (503)."""

    def __init__(self, scope: Literal["principal", "global"], limit: int) -> None:
        super().__init__(f"{scope} session cap of {limit} reached")
        self.scope = scope
        self.limit = limit


class StoredSession(Protocol):
    """What a store needs to know about a session (``SessionState`` satisfies it)."""

    @property
    def session_id(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def last_accessed(self) -> float: ...
    @property
    def implicit(self) -> bool: ...


@dataclass(slots=True)
class SessionRecord:
    """A session's metadata as read back from a store that does not hold live objects."""

    session_id: str
    principal: str
    created_at: float
    last_accessed: float
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    created: bool
    """False when the id already existed (create-if-absent lost the race)."""
    evicted: tuple[str, ...] = ()
    """Sessions removed to make room (per-principal cap with eviction)."""
    evicted_sessions: tuple[StoredSession, ...] = ()
    """The removed sessions themselves, from stores that hold live objects."""


@dataclass(frozen=True, slots=True)
class Caps:
    per_principal: int | None = None
    global_limit: int | None = None
    evict_oldest: bool = False


class SessionStore(Protocol):
    holds_live_objects: bool
    """True when :meth:`load` returns the very object given to :meth:`create` (in-memory)."""
    default_touch_interval: float
    """Seconds between store writes for a busy session; 0 writes on every request."""

    async def create(
        self, session: StoredSession, *, ttl: float, now: float, caps: Caps
    ) -> CreateOutcome: ...

    async def load(self, session_id: str) -> StoredSession | None: ...

    async def touch(self, session: StoredSession, *, ttl: float, now: float) -> bool:
        """Record use at ``now``, push the expiry to ``now + ttl``; False if the session is gone."""
        ...

    async def delete(self, session_id: str, *, created_at: float | None = None) -> bool:
        """Remove the session; with ``created_at``, only if it is that very session (a fenced
        delete: compensation for a refused creation never removes a later session with the id)."""
        ...

    async def expire(
        self,
        *,
        now: float,
        idle_timeout: float,
        max_age: float | None,
        is_busy: Callable[[str], bool],
    ) -> list[tuple[StoredSession, str]]:
        """Remove sessions idle past ``idle_timeout`` or older than ``max_age``.

        Returns them with the reason (``"expired"`` or ``"max_age"``).

        Must cost O(expired), not O(sessions). Busy sessions are kept. Stores with native expiry
        (Redis TTL) return an empty list.
        """
        ...

    async def count(self, *, now: float) -> int: ...

    async def count_for(self, principal: str, *, now: float) -> int: ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
