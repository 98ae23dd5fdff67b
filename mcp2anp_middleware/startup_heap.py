"""A service that takes the objects made at startup out of the garbage collector's way.

A server process imports the MCP SDK, pydantic's schemas, the HTTP stack and the app: about a
hundred thousand container objects, made once and kept for the process's life. CPython's full
(oldest-generation) collection walks every one of them each time it runs, and it runs once
enough objects have survived the younger collections. Serving requests does that now and then
(a session's records outlive several young collections), and each full collection then stops the
process for about 80 ms here: a latency spike for every request waiting on that worker, and CPU
spent proving again that modules and classes are still alive.

``gc.freeze()`` moves every object alive at that moment into a permanent generation that
collections skip. Done once startup is over (after a collection, so no garbage is frozen), a
full collection walks only what requests made since: a few milliseconds instead of 80.
Objects made at startup are still freed by reference counting; what freezing gives up is only
the collection of cycles among them, which startup objects (modules, classes, functions,
schemas) do not form as garbage. Stopping the service unfreezes them, so an app stopped inside
a longer-lived process (tests, a host that restarts apps) leaves its startup objects collectable
again.

The freeze is process-wide, so it is a choice for whoever owns the process: the launcher
(``python -m example_app``) runs it; an app hosting :class:`~mcp2anp_middleware.ANPMiddleware`
turns it on with ``services=[frozen_startup_heap]``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def frozen_startup_heap() -> AsyncIterator[None]:
    """A middleware service (see ``services=``): collect, then freeze what is left, for as long
    as the middleware runs."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
