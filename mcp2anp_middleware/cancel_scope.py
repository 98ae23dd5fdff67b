"""anyio's cancel scope for the per-request paths, without anyio's per-call backend look-up.

``anyio.CancelScope()`` asks sniffio which event loop runs and then the backend for its class on
every call, about half of what a scope costs (several microseconds, twice per request here). The
package serves asyncio servers only (it reads bodies with asyncio timers), so its hot paths make
the asyncio backend's scope directly: the same class ``anyio.CancelScope()`` returns there.
"""

from __future__ import annotations

import anyio

try:  # anyio's backend module is not public API: fall back to the look-up if it moves
    from anyio._backends._asyncio import CancelScope as _AsyncioCancelScope
except ImportError:  # pragma: no cover - depends on the installed anyio
    _AsyncioCancelScope = anyio.CancelScope  # type: ignore[misc,assignment]


def cancel_scope(*, shield: bool = False) -> anyio.CancelScope:
    """A new :class:`anyio.CancelScope` for the running asyncio loop."""
    scope: anyio.CancelScope = _AsyncioCancelScope(shield=shield)
    return scope
