"""Hearing that the server is stopping before it waits for open connections.

ASGI has no event for "the server is stopping": the lifespan's shutdown comes only after the
server has waited for every connection to close. An open GET stream (SSE) does not close by
itself, so under uvicorn a SIGTERM waited for it for good, or for the graceful-shutdown timeout,
after which uvicorn cancels every request still running (tool calls included). Servers learn of
a stop from SIGTERM and SIGINT, through a handler installed with ``signal.signal`` (uvicorn and
gunicorn's uvicorn worker) or through the event loop (seen here as asyncio's no-op handler, the
loop's own callback running as before). :func:`on_exit_signals` chains to the handler installed
when the app starts: that handler runs first, exactly as before, then the app is told on its
event loop. Nothing is installed off the main thread (Python delivers signals there only) or
where a signal has no Python handler (default or ignored: the process then ends without a
drain anyway).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_listeners: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []
"""Who is told, on which loop (several apps may run in one process)."""
Handler = Callable[[int, FrameType | None], Any]
_chained: dict[int, tuple[Handler, Handler]] = {}
"""The handler installed here for each signal, and the one it chains to."""


def on_exit_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` on the running loop when the process gets SIGINT or SIGTERM (after the
    handler installed now has run). Returns the undo, which takes the handlers back out once
    nobody listens (unless something replaced them since)."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    entry = (asyncio.get_running_loop(), callback)
    _listeners.append(entry)
    for signum in EXIT_SIGNALS:
        current = signal.getsignal(signum)
        known = _chained.get(signum)
        if known is not None and current is known[0]:
            continue  # chained already
        if callable(current):
            _chained[signum] = (_chain(current), current)
            signal.signal(signum, _chained[signum][0])

    def undo() -> None:
        if entry in _listeners:
            _listeners.remove(entry)
        if _listeners:
            return
        for signum, (handler, previous) in list(_chained.items()):
            if signal.getsignal(signum) is handler:
                signal.signal(signum, previous)
            del _chained[signum]

    return undo


def _chain(previous: Handler) -> Handler:
    def handler(signum: int, frame: FrameType | None) -> Any:
        try:
            return previous(signum, frame)  # (Python's SIGINT default raises KeyboardInterrupt)
        finally:
            for loop, callback in list(_listeners):
                if not loop.is_closed():
                    loop.call_soon_threadsafe(callback)

    return handler


def _nothing() -> None:
    pass
