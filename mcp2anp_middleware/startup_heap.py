"""A service that takes the objects made at startup out of the garbage collector's way.

A server process imports the MCP SDK, pydantic's schemas, the HTTP stack and the app: about a
hundred thousand container objects, made once and kept for the process's life. CPython's full
(oldest-generation) collection walks every one of them each time it runs, and it runs once
enough objects have survived the younger collections. Serving requests does that now and then
(a session's records outlive several young collections), and each full collection then stops the
process for about 80 ms here: a latency spike for every request waiting on that worker, and CPU
spent proving again that modules and classes are still alive.

``gc.freeze()`` moves every object alive at that moment into a permanent generation that
collections skip. Done once the middleware has started (after a collection, so no garbage is
frozen), a full collection walks only what was made since: a few milliseconds instead of 80.

What it gives up: everything alive at the freeze is kept from the collector until it is
unfrozen, not only modules and classes but also what startup made (sessions restored from a
state file, store connections). Frozen objects are still freed by reference counting; only a
cycle through a frozen object waits. Startup objects rarely become such garbage, and a server
that restarts its app gets them back: the freeze is undone when the last running middleware
with this service stops, unless something else had frozen objects before (a pre-fork server's
own ``gc.freeze()``), which is then left to its owner.

The freeze is process-wide, so it is a choice for whoever owns the process: the launcher
(``python -m example_app``) runs it; an app hosting :class:`~mcp2anp_middleware.ANPMiddleware`
turns it on with ``services=[frozen_startup_heap]``. It belongs to servers that send lifespan
events: without them the middleware starts inside the first request, so the collection (tens of
milliseconds) stalls that request's loop, and what that request holds is frozen with the rest.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator

_running = 0
"""How many middleware with this service run now (several apps may share a process)."""
_frozen_before = False
"""Objects were frozen by someone else when the first of them started: not ours to unfreeze."""


@contextlib.asynccontextmanager
async def frozen_startup_heap() -> AsyncIterator[None]:
    """A middleware service (see ``services=``; list it last, after the services that build
    what the server keeps): collect, then freeze what is left, for as long as it runs."""
    global _running, _frozen_before
    if _running == 0:
        _frozen_before = gc.get_freeze_count() > 0
    _running += 1
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        _running -= 1
        if _running == 0 and not _frozen_before:
            gc.unfreeze()
