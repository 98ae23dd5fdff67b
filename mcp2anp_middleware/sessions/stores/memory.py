"""The embedded default store: records in this process's memory, expiry in O(expired).

Records are ordered by deadline in a heap of ``(expires_at, id)`` entries, where each record has
an entry no later than its deadline. A write that moves the deadline later (nearly every write:
a session's use pushes it on) leaves the record's entry as it is; when that entry reaches the top,
expiry finds the later deadline and pushes the record back under it. Only a new record, or a
deadline moved earlier, pushes an entry. So expiry pops from the top and stops at the first
deadline still ahead: its cost grows with the number of sessions expired or used since their
entry was pushed, not with the live ones. While deadlines only move later (the usual case) the
heap holds one entry per session; a deadline moved earlier, or an id made again, leaves a spare
entry that is pushed back with its record until the heap is rebuilt (when it holds more than
twice as many entries as records). A per-principal dict in order of use serves caps, eviction of
the least recently used, and listing; a per-principal set holds the reservations not yet
committed, which eviction passes over.
"""

from __future__ import annotations

import heapq
from dataclasses import replace

from mcp2anp_middleware.sessions.loop_slice import LoopSlice
from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    Caps,
    CommitOutcome,
    CreateOutcome,
    SessionRecord,
)


class InMemorySessionStore:
    """Sessions of this process only; a large expiry lets other tasks run every ``batch``
    entries, or every few milliseconds if that comes first (:class:`LoopSlice`)."""

    default_touch_interval = 0.0

    @property
    def writes_in_place(self) -> bool:
        """:meth:`write` never suspends, so a registry need not order writes to one session,
        and may call :meth:`write_now`, :meth:`mark_used` and :meth:`commit_now` instead (unless
        a subclass wrote its own writes, commits or :meth:`mark_used`)."""
        kind = type(self)
        return (
            kind.write is InMemorySessionStore.write
            and kind.write_now is InMemorySessionStore.write_now
            and kind.mark_used is InMemorySessionStore.mark_used
            and kind.commit_now is InMemorySessionStore.commit_now
            and kind.commit is InMemorySessionStore.commit
        )

    def __init__(self, *, batch: int = 1000) -> None:
        self.batch = max(1, batch)
        self._users = 0
        self._records: dict[str, SessionRecord] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._by_principal: dict[str, dict[str, None]] = {}
        self._pending: dict[str, set[str]] = {}
        """Per principal, its reservations not yet committed (``create(pending=True)``)."""

    def __len__(self) -> int:
        return len(self._records)

    def use(self) -> None:
        """One more registry reads and writes this store (see :attr:`users`)."""
        self._users += 1

    @property
    def users(self) -> int:
        """How many registries were ever made over this store (never fewer: one made and
        dropped may have changed records another holds live objects of). With one, every change
        to the store goes through that registry, which may then trust its own live objects
        without reading records."""
        return self._users

    def records(self) -> list[SessionRecord]:
        """Every record (copies), for the state file and tests."""
        return [replace(record) for record in self._records.values()]

    async def create(
        self,
        record: SessionRecord,
        *,
        ttl: float,
        now: float,
        caps: Caps,
        pending: bool = False,
    ) -> CreateOutcome:
        session_id, principal = record.session_id, record.principal
        if session_id in self._records:
            return CreateOutcome(created=False)
        owned = self._by_principal.get(principal)
        held = len(owned) if owned else 0
        cap = caps.per_principal
        at_cap = cap is not None and held >= cap
        # Evicting: over the cap only by creations under way (see SessionStore.create).
        if at_cap and (not caps.evict_oldest or held >= 2 * (cap or 0)):
            raise CapExceeded("principal", cap or 0)
        # An eviction frees a place (now, or at the commit), so count it before refusing at the
        # global cap (and never evict for a request that is refused anyway).
        total_after = len(self._records) - (1 if at_cap else 0)
        if caps.global_limit is not None and total_after >= caps.global_limit:
            raise CapExceeded("global", caps.global_limit)
        self._store(record)
        if pending:
            # (kept whatever this caller's caps: another registry's may evict)
            self._pending.setdefault(principal, set()).add(session_id)
            return CreateOutcome(created=True)
        return CreateOutcome(created=True, evicted=self._trim(principal, session_id, caps))

    async def read(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)  # callers write new records, never mutate this one

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        return self.write_now(record)

    def write_now(self, record: SessionRecord) -> bool:
        """:meth:`write`, done at once (no TTL: the record's ``expires_at`` is its deadline)."""
        current = self._records.get(record.session_id)
        if current is None or current.created_at != record.created_at:
            return False
        owned = self._by_principal[current.principal]
        del owned[record.session_id]  # to the back: most recently used
        self._store(record, current)
        return True

    def mark_used(self, session_id: str, created_at: float | None = None) -> bool:
        """A request began using the session (or its creation was committed): its principal's
        most recently used now (the eviction order), without a new record (its registry writes
        one when the request ends). False if the store does not hold it (of ``created_at``)."""
        record = self._records.get(session_id)
        if record is None or (created_at is not None and record.created_at != created_at):
            return False
        owned = self._by_principal[record.principal]
        del owned[session_id]
        owned[session_id] = None
        return True

    async def commit(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
    ) -> CommitOutcome:
        if not await self.write(record, ttl=ttl, now=now):
            return CommitOutcome(committed=False)
        return CommitOutcome(committed=True, evicted=self._settle(record.session_id, caps))

    def commit_now(
        self, session_id: str, created_at: float, caps: Caps
    ) -> tuple[SessionRecord, ...] | None:
        """:meth:`commit` without a new record (as :meth:`mark_used`, which it does too): the
        sessions evicted for it, or None if the store does not hold it (of ``created_at``)."""
        if not self.mark_used(session_id, created_at):
            return None
        return self._settle(session_id, caps)

    def _settle(self, session_id: str, caps: Caps) -> tuple[SessionRecord, ...]:
        """``session_id`` (held) is no longer pending: evict for it as its cap says."""
        principal = self._records[session_id].principal
        pending = self._pending.get(principal)
        if pending is not None:
            pending.discard(session_id)
            if not pending:
                del self._pending[principal]
        return self._trim(principal, session_id, caps)

    def _trim(self, principal: str, keep: str, caps: Caps) -> tuple[SessionRecord, ...]:
        """With eviction on, remove the principal's least recently used sessions that are not
        pending (nor ``keep``) while more of those than its cap remain."""
        cap = caps.per_principal
        if not caps.evict_oldest or cap is None:
            return ()
        owned = self._by_principal[principal]
        pending = self._pending.get(principal, ())
        over = len(owned) - len(pending) - cap
        if over <= 0:
            return ()
        victims: list[str] = []
        for session_id in owned:  # least recently used first
            if session_id != keep and session_id not in pending:
                victims.append(session_id)
                if len(victims) == over:
                    break
        evicted = tuple(self._records[session_id] for session_id in victims)
        for session_id in victims:
            self._forget(session_id)
        return evicted

    async def remove(self, session_id: str, *, created_at: float | None = None) -> bool:
        record = self._records.get(session_id)
        if record is None or (created_at is not None and record.created_at != created_at):
            return False
        self._forget(session_id)
        return True

    async def principal_sessions(
        self, principal: str | None, *, now: float, limit: int | None = None
    ) -> list[SessionRecord]:
        ids = self._records if principal is None else self._by_principal.get(principal, {})
        found = [replace(self._records[i]) for i in ids if self._records[i].expires_at > now]
        return found if limit is None else found[:limit]

    async def count(self, *, now: float) -> int:
        return len(self._records)

    async def expire(self, *, now: float) -> list[SessionRecord]:
        removed: list[SessionRecord] = []
        # (If a write rebuilds the heap while this yields, this goes on with the old one: every
        # record then has its exact entry in the new heap, so what is pushed here is only spare.)
        deadlines = self._deadlines
        loop_slice = LoopSlice(steps=self.batch)
        while deadlines and deadlines[0][0] <= now:
            _, session_id = heapq.heappop(deadlines)
            record = self._records.get(session_id)
            if record is None:
                pass  # removed since
            elif record.expires_at > now:  # a later deadline (written since): seen again then
                heapq.heappush(deadlines, (record.expires_at, session_id))
            else:
                self._forget(session_id)
                removed.append(record)
            # Only once the entry is dealt with: a cancellation while this yields loses no
            # entry (a record left without one would never expire). Entries pushed back count
            # too: they are work.
            if loop_slice.over():
                await loop_slice.next()
        return removed

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def _store(self, record: SessionRecord, previous: SessionRecord | None = None) -> None:
        """Keep ``record`` (replacing ``previous``, the record of the same session if any)."""
        self._records[record.session_id] = record
        self._by_principal.setdefault(record.principal, {})[record.session_id] = None
        if previous is None or record.expires_at < previous.expires_at:
            heapq.heappush(self._deadlines, (record.expires_at, record.session_id))
        # (else the entry that stood for the earlier deadline stands for this one: see above)
        if len(self._deadlines) > 2 * len(self._records) + 64:
            self._deadlines = [(r.expires_at, r.session_id) for r in self._records.values()]
            heapq.heapify(self._deadlines)

    def _forget(self, session_id: str) -> None:
        record = self._records.pop(session_id)
        principal = record.principal
        owned = self._by_principal[principal]
        del owned[session_id]
        if not owned:
            del self._by_principal[principal]
        pending = self._pending.get(principal)
        if pending is not None and session_id in pending:
            pending.discard(session_id)
            if not pending:
                del self._pending[principal]
