"""Saving in-memory sessions at shutdown and restoring the unexpired ones at start.

Only metadata is saved (ids, principals, times, and the MCP handshake the session was opened
with, without which a restored session would answer every request as uninitialized), never
credentials: a restored session gets its credential from the next request's authentication,
which must carry the same principal. The file holds live session ids, which are secrets: it is
written with mode 0600 via a temporary file.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from mcp2anp_middleware.private_files import write_private_file
from mcp2anp_middleware.sessions.ids import implicit_session_id, is_well_formed_session_id
from mcp2anp_middleware.sessions.state import SessionConfig, SessionState

if TYPE_CHECKING:
    from mcp2anp_middleware.sessions.registry import SessionRegistry

FORMAT_VERSION = 1

logger = structlog.get_logger("mcp2anp_middleware.sessions")


async def save_state_file(registry: SessionRegistry, path: Path) -> int:
    from mcp2anp_middleware.sessions.stores.memory import InMemorySessionStore

    if not isinstance(registry.store, InMemorySessionStore):
        return 0  # shared stores keep sessions by design
    sessions = [
        {
            "id": r.session_id,
            "principal": r.principal,
            "created_at": r.created_at,
            "last_accessed": registry.last_use(r),
            "implicit": r.implicit,
            "handshake": r.handshake,
        }
        for r in registry.store.records()
    ]
    payload = json.dumps({"version": FORMAT_VERSION, "sessions": sessions})
    await asyncio.to_thread(_write_private, path, payload)
    return len(sessions)


def _write_private(path: Path, payload: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path, payload.encode())


async def load_state_file(registry: SessionRegistry, path: Path) -> int:
    """Restore unexpired sessions from ``path`` (missing or unreadable file: nothing restored)."""
    try:
        document = json.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return 0
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        return 0
    listed = document.get("sessions")
    if not isinstance(listed, list):
        return 0  # (a file of another shape restores nothing and never stops the start)
    now = registry.clock()
    restored = 0
    entries = [state for state in map(_restored, listed, itertools.repeat(now)) if state]
    entries.sort(key=lambda state: state.last_accessed)  # the live cache is ordered by use
    for state in entries:
        if registry.deadline(state) < now:
            continue
        try:
            await registry.register(state)
        except Exception:
            continue
        restored += 1
    # Restored once: a crash later must not resurrect them.
    try:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    except OSError:  # (a read-only directory): the start goes on; the next save replaces it
        logger.warning("Restored state file could not be deleted", path=str(path))
    return restored


def _restored(entry: object, now: float) -> SessionState | None:
    """The session an entry of the file describes, or None for one that is malformed (an edited
    or damaged file restores what it can, and nothing that would never expire). Times past
    ``now`` (a file from a machine whose clock was ahead) are taken as ``now``."""
    if not isinstance(entry, dict):
        return None
    session_id, principal = entry.get("id"), entry.get("principal")
    implicit = entry.get("implicit") is True
    if not (isinstance(session_id, str) and isinstance(principal, str)):
        return None
    try:
        expected_id = implicit_session_id(principal) if implicit else None
    except UnicodeError:  # (a lone surrogate: no credential names such a principal)
        return None
    if not is_well_formed_session_id(session_id) or (
        session_id != expected_id if implicit else session_id.startswith("implicit-")
    ):
        return None
    try:
        created_at = float(entry["created_at"])
        last_accessed = float(entry["last_accessed"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(created_at) and math.isfinite(last_accessed)):
        return None
    created_at = min(created_at, now)
    state = SessionState(
        session_id,
        SessionConfig(principal=principal),
        created_at=created_at,
        last_accessed=min(max(last_accessed, created_at), now),
        implicit=implicit,
    )
    handshake = entry.get("handshake")
    if isinstance(handshake, str):  # (files written before it was saved have none)
        state.handshake = sys.intern(handshake)
    return state
