"""Time sources, injectable so expiry can be tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""A zero-argument callable returning seconds since the Unix epoch."""

system_clock: Clock = time.time


class ManualClock:
    """A clock that only moves when told to; for tests and simulations."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
