"""The narrow store interface: session RECORDS, the same for every store.

A store keeps who a session belongs to and its times, nothing secret and nothing live: the live
objects (the session's signer, document cache, tool handler, later its MCP transport) stay in each
process's :class:`~mcp2anp_middleware.session_registry.SessionRegistry`, rebuilt from the record
when a session reaches a process that has not seen it. Its credential comes from the request's own
(re-)authentication, so no key material is ever written to a store.

The interface is starsessions' ``read`` / ``write`` / ``remove`` with the TTL passed in, plus what
caps, indexes and expiry need: an atomic create-if-absent that applies the caps, a per-principal
listing, a count, and ``expire`` for stores without native expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


class StoreUnavailable(Exception):
    """The store cannot be reached; requests are answered 503 until it is back."""


class SessionGone(StoreUnavailable):
    """A new session's record was gone when its creating request came to commit it (revoked or
    expired meanwhile, or its reservation lapsed): not an outage, the client starts again. A
    :class:`StoreUnavailable`, so code that treats any failed commit alike still does."""


class UnconfirmedCommit(StoreUnavailable):
    """A commit the store carried out but could not confirm on enough replicas: refused as an
    outage, though the sessions it evicted (``evicted``) are gone all the same."""

    def __init__(self, message: str, evicted: tuple[SessionRecord, ...]) -> None:
        super().__init__(message)
        self.evicted = evicted


class CapExceeded(Exception):
    """A session cap refused a new session: ``scope`` is "principal" (429) or "global" (503)."""

    def __init__(self, scope: Literal["principal", "global"], limit: int) -> None:
        super().__init__(f"{scope} session cap of {limit} reached")
        self.scope = scope
        self.limit = limit


@dataclass(slots=True)
class SessionRecord:
    """What a store keeps of one session.

    ``expires_at`` is the session's deadline as of its last write: the earlier of last use plus
    the idle timeout and creation plus the maximum age. The registry computes it (the expiry rule
    lives in one place); stores only order and drop by it.
    """

    session_id: str
    principal: str
    created_at: float
    last_used: float
    expires_at: float
    implicit: bool = False
    handshake: str | None = None
    """The MCP handshake the session was opened with (compact JSON, see
    :mod:`mcp2anp_middleware.mcp_hosting.handshake`), so every process serves it initialized."""


@dataclass(frozen=True, slots=True)
class CreateOutcome:
    created: bool
    """False when the id already existed (create-if-absent lost the race)."""
    evicted: tuple[SessionRecord, ...] = ()
    """Sessions removed to make room (per-principal cap with eviction; only for a record that
    counts at once, never for a reservation: see :meth:`SessionStore.commit`)."""


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    committed: bool
    """False when the record was gone (lapsed, revoked, expired) or of another creation."""
    evicted: tuple[SessionRecord, ...] = ()
    """Sessions removed to make room for this one (per-principal cap with eviction)."""


@dataclass(frozen=True, slots=True)
class Caps:
    per_principal: int | None = None
    global_limit: int | None = None
    evict_oldest: bool = False


class SessionStore(Protocol):
    default_touch_interval: float
    """Seconds between writes for a session in use (0: every request). A shared store is written
    at most this often per session, so a record's ``last_used`` may lag by as much."""

    async def create(
        self,
        record: SessionRecord,
        *,
        ttl: float,
        now: float,
        caps: Caps,
        pending: bool = False,
    ) -> CreateOutcome:
        """Store ``record`` unless its id exists, applying ``caps`` atomically; ``ttl`` seconds
        from ``now`` (the registry's clock) it expires by itself.

        ``pending``: a reservation for a creating request that may still be refused. It counts
        against the caps at once (concurrent creations cannot pass them), but with
        ``caps.evict_oldest`` it evicts nothing, and nothing evicts it, until :meth:`commit`: a
        refused ``initialize`` must not cost its principal a session. So that evicting
        principal may hold up to twice its cap while creations are under way, never more.
        Without ``pending`` the record counts at once and evicts as a commit does."""
        ...

    async def commit(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
    ) -> CommitOutcome:
        """The reservation ``record`` (same id and ``created_at``) became a session: write it as
        :meth:`write` does, and with ``caps.evict_oldest`` remove the principal's least recently
        used sessions that are not pending, while more of those than the cap remain (never this
        one). Not committed if the record is gone. A store that made the change but cannot
        confirm it (replicas) raises :class:`UnconfirmedCommit` with what it evicted."""
        ...

    async def read(self, session_id: str) -> SessionRecord | None: ...

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        """Update an existing record and push its expiry to ``ttl`` from now; False if it is
        gone (never re-creates one)."""
        ...

    async def remove(self, session_id: str, *, created_at: float | None = None) -> bool:
        """Remove the session; with ``created_at``, only if it is that very session (a fenced
        delete: compensation for a refused creation never removes a later session with the id)."""
        ...

    async def principal_sessions(
        self, principal: str | None, *, now: float, limit: int | None = None
    ) -> list[SessionRecord]:
        """The principal's unexpired sessions, least recently used first (None: everyone's)."""
        ...

    async def count(self, *, now: float) -> int: ...

    async def expire(self, *, now: float) -> list[SessionRecord]:
        """Remove and return records whose ``expires_at`` has passed, in O(expired).

        Stores with native expiry (Redis TTL) return an empty list.
        """
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
