"""The middleware's options, grouped by what they are about."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_MAX_BODY_SIZE = 4 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a client has to deliver a whole request body before it is answered 408."""


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long sessions live and how many there may be.

    ``timeout``: idle seconds before a session expires; ``max_age``: absolute lifetime (None:
    none); ``cleanup_interval``: seconds between sweeps; ``touch_interval``: seconds between
    writes of a busy session to a shared store (None: the store's default); the caps limit
    sessions per principal and in all, and ``cap_policy`` says what a principal at its cap gets:
    ``"reject"`` (429) or ``"evict_oldest"`` (its least recently used session makes room).
    """

    timeout: float = 1800.0
    max_age: float | None = None
    cleanup_interval: float = 300.0
    touch_interval: float | None = None
    per_principal_cap: int | None = None
    global_cap: int | None = None
    cap_policy: Literal["reject", "evict_oldest"] = "reject"

    def __post_init__(self) -> None:
        if self.cap_policy not in ("reject", "evict_oldest"):
            raise ValueError("cap_policy must be 'reject' or 'evict_oldest'")
        if not (math.isfinite(self.cleanup_interval) and self.cleanup_interval > 0):
            raise ValueError("cleanup_interval must be a finite number of seconds above 0")
        for name in ("per_principal_cap", "global_cap"):
            cap = getattr(self, name)
            if cap is not None and (type(cap) is not int or cap < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 (or None: no cap)")


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a request may cost before it is refused: body size (413), time to send the body
    (408), and the browser origins allowed to call (403; None: loopback origins only)."""

    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    allowed_origins: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.body_timeout) and self.body_timeout > 0):
            got = self.body_timeout
            raise ValueError(
                f"body_timeout must be a finite number of seconds above 0, got {got!r}"
            )
