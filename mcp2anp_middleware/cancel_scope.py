"""Cancel scopes for the per-request paths: anyio's without its per-call backend look-up, and a
request's own (:class:`RequestCancellation`).

``anyio.CancelScope()`` asks sniffio which event loop runs and then the backend for its class on
every call, about half of what a scope costs (several microseconds, twice per request here). The
package serves asyncio servers only (it reads bodies with asyncio timers), so its hot paths make
the asyncio backend's scope directly: the same class ``anyio.CancelScope()`` returns there.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
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


class RequestCancellation:
    """Cancels the task serving one request while it runs inside ``with``: what a request of a
    live session needs of a cancel scope, for a fraction of an anyio scope's cost per request.

    A native cancellation, taken back on the way out as ``asyncio.timeout`` takes back its own:
    a ``CancelledError`` that reaches ``__exit__`` is swallowed only if this scope delivered it
    and no other cancellation of the task came meanwhile (``uncancel`` counts them), so a server
    cancelling the request is never mistaken for it. anyio scopes inside (``fail_after`` in a
    request to the client, task groups) let a native cancellation through, as they must.

    - :meth:`cancel` from the serving task itself is delivered on the next loop iteration, at the
      task's next wait inside the scope (a cancellation delivered at once would land at the next
      wait wherever it is, possibly after the scope); after the scope, nothing is delivered.
    - While :attr:`shielded` is set, a cancellation is kept back: :attr:`called` says it came.
    - One delivery: a task that swallows the ``CancelledError`` runs on (anyio would deliver it
      again on every loop iteration; no handler of this package's tools swallows it).
    """

    # One is made for every request: what starts the same for all is a class attribute.
    called = False
    shielded = False
    _delivered = False
    _task: asyncio.Task[Any] | None = None
    _at_enter = 0

    def __enter__(self) -> RequestCancellation:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._at_enter = task.cancelling()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        task, self._task = self._task, None
        if not self._delivered or task is None:
            return False
        ours = task.uncancel() <= self._at_enter  # no other cancellation came meanwhile
        return ours and exc_type is not None and issubclass(exc_type, asyncio.CancelledError)

    def cancel(self) -> None:
        if self.called:
            return
        self.called = True
        task = self._task
        if task is None or self.shielded:
            return
        if task is asyncio.current_task():
            task.get_loop().call_soon(self._deliver)
        else:
            self._deliver()

    def _deliver(self) -> None:
        task = self._task
        if task is not None and not self.shielded and not self._delivered:
            self._delivered = True
            task.cancel()
