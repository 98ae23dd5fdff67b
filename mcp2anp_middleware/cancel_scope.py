"""Cancellation helpers: anyio's cancel scope for the per-request paths, without anyio's per-call
backend look-up, and the cancellation of a background task that must end.

``anyio.CancelScope()`` asks sniffio which event loop runs and then the backend for its class on
every call, about half of what a scope costs (several microseconds, twice per request here). The
package serves asyncio servers only (it reads bodies with asyncio timers), so its hot paths make
the asyncio backend's scope directly: the same class ``anyio.CancelScope()`` returns there.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

import anyio

try:  # anyio's backend module is not public API: fall back to the look-up if it moves
    from anyio._backends._asyncio import CancelScope as _AsyncioCancelScope
except ImportError:  # pragma: no cover - depends on the installed anyio
    _AsyncioCancelScope = anyio.CancelScope  # type: ignore[misc,assignment]


def cancel_scope(*, shield: bool = False) -> anyio.CancelScope:
    """A new :class:`anyio.CancelScope` for the running asyncio loop."""
    scope: anyio.CancelScope = _AsyncioCancelScope(shield=shield)
    return scope


CANCEL_AGAIN = 0.5
"""Seconds between cancellations of a background task that has not ended yet."""


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` until it has ended, then wait for it.

    A native cancellation is delivered once, and a library may swallow it: redis-py's read
    timeout firing as the cancellation arrives turns it into a timeout, which a loop that
    retries after failures takes for one. Waiting for such a task after one ``cancel()`` waited
    for good (a middleware's stop hung); cancelled again every half second, it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN)
    with suppress(asyncio.CancelledError):
        await task
