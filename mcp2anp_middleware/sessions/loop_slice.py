"""Long loops on the event loop, cut into slices: no request waits long behind a sweep.

A sweep that removes many sessions runs in the event loop's thread, and while it runs, no request
is served. Yielding every so many steps is not enough: what a step costs varies several times
over with the host's logging and the machine's state (the same 1,000 heap pops measured 7 ms and
28 ms in one run). So a slice ends after a few milliseconds, or after a number of steps, whichever
comes first.
"""

from __future__ import annotations

import asyncio
import time

SLICE_SECONDS = 0.005
"""How long a slice holds the event loop before other tasks run."""


class LoopSlice:
    """Call :meth:`over` after each step of a long loop; when it is True, ``await``
    :meth:`next`, which lets other tasks run and starts a new slice."""

    __slots__ = ("_steps", "_taken", "_until", "seconds")

    def __init__(self, seconds: float = SLICE_SECONDS, *, steps: int | None = None) -> None:
        self.seconds = seconds
        self._steps = steps
        self._taken = 0
        self._until = time.perf_counter() + seconds

    def over(self) -> bool:
        """Whether this slice has held the loop long enough (time, or ``steps`` steps)."""
        self._taken += 1
        return (
            self._steps is not None and self._taken >= self._steps
        ) or time.perf_counter() >= self._until

    async def next(self) -> None:
        """Let other tasks run, then start a new slice (timed from when this task resumes)."""
        await asyncio.sleep(0)
        self._taken = 0
        self._until = time.perf_counter() + self.seconds
