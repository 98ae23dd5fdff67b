"""Saving in-memory sessions at shutdown and restoring the unexpired ones at start.

Only metadata is saved (ids, principals, times, and the MCP handshake the session was opened
with, without which a restored session would answer every request as uninitialized), never
credentials: a restored session gets its credential from the next request's authentication,
which must carry the same principal. The file holds live session ids, which are secrets: it is
written with mode 0600 via a temporary file.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mcp2anp_middleware.sessions.state import SessionConfig, SessionState

if TYPE_CHECKING:
    from mcp2anp_middleware.sessions.registry import SessionRegistry

FORMAT_VERSION = 1


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
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(payload)
    os.replace(temporary, path)


async def load_state_file(registry: SessionRegistry, path: Path) -> int:
    """Restore unexpired sessions from ``path`` (missing or unreadable file: nothing restored)."""
    try:
        document = json.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        return 0
    now = registry.clock()
    restored = 0
    entries = []
    for entry in document.get("sessions", []):
        try:
            state = SessionState(
                str(entry["id"]),
                SessionConfig(principal=str(entry["principal"])),
                created_at=float(entry["created_at"]),
                last_accessed=float(entry["last_accessed"]),
                implicit=entry.get("implicit") is True,
            )
        except (KeyError, TypeError, ValueError):
            continue
        handshake = entry.get("handshake")
        if isinstance(handshake, str):  # (files written before it was saved have none)
            state.handshake = sys.intern(handshake)
        if not (math.isfinite(state.created_at) and math.isfinite(state.last_accessed)):
            continue  # an edited or damaged file must not restore a session that never expires
        entries.append(state)
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
    await asyncio.to_thread(path.unlink, missing_ok=True)
    return restored
