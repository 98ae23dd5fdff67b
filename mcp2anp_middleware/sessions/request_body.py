"""Reading a request body once, with a size bound, and handing it on to the app."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, cast

import pydantic_core
from starlette.types import Message, Receive


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def read_body(
    receive: Receive,
    limit: int,
    within: float | None = None,
    *,
    declared: bytes | None = None,
) -> bytes:
    """The whole body, refusing early on a declared (``declared``: the ``Content-Length``
    header, if any) or streamed size above ``limit``, and ``TimeoutError`` if it has not all
    come ``within`` seconds of the first wait for it.

    Most bodies have arrived with their headers, and servers hand them over without
    suspending: the deadline is armed only if reading suspends (:class:`_ArmOnSuspend`), as a
    bare loop timer cancelling this task, undone as ``asyncio.timeout`` undoes its own
    (``uncancel``). This runs for every POST."""
    # (More than 4,000 digits is too large whatever they say, and int() refuses past 4,300.)
    if (
        declared is not None
        and declared.isdigit()
        and (len(declared) > 4000 or int(declared) > limit)
    ):
        raise BodyTooLarge
    if within is None:
        return await _read_body(receive, limit, None)
    reading = receive().__await__()
    if type(reading) not in _STEPPABLE:  # not a coroutine or generator: awaited as it is
        rest = _read_body(receive, limit, _Awaiting(reading))
    else:
        try:
            waiting_on = reading.send(None)
        except StopIteration as done:  # the first part had come: no deadline unless more is due
            message: Message = done.value
            if message["type"] == "http.request" and not message.get("more_body", False):
                body = message.get("body", b"")  # all of it: the usual case, no wait
                if len(body) > limit:
                    raise BodyTooLarge from None
                return body if type(body) is bytes else bytes(body)
            rest = _read_body(receive, limit, message)
        else:
            rest = _read_body(receive, limit, _Started(reading, waiting_on))
    deadline = _Deadline(within)
    try:
        body = await _ArmOnSuspend(rest, deadline.arm)
    except asyncio.CancelledError:
        if deadline.expired and deadline.task.uncancel() <= deadline.already:
            raise TimeoutError from None  # this timer's cancellation, no other
        raise
    except BaseException:
        if deadline.expired:  # it fired and something else ended the read: take it back
            deadline.task.uncancel()
        raise
    finally:
        if deadline.timer is not None:
            deadline.timer.cancel()
    if deadline.expired:  # it fired as the body completed: take its cancellation back
        deadline.task.uncancel()
    return body


async def _probe() -> None:
    return None


def _coroutine_wrapper_type() -> type:
    probe = _probe()
    try:
        return type(probe.__await__())
    finally:
        probe.close()


_STEPPABLE = frozenset({_coroutine_wrapper_type(), types.GeneratorType})
"""Iterators of an await that this module steps itself (``send``, ``throw`` and ``close`` as
PEP 380 uses them): an ``async def`` ``receive`` (what servers give) and generators. Any other
awaitable is awaited as it is."""


class _Deadline:
    """``within`` seconds for a body, from the first wait for it: a loop timer that cancels the
    reading task. Nothing is looked up or armed until a wait comes (:meth:`arm`)."""

    __slots__ = ("already", "expired", "task", "timer", "within")

    def __init__(self, within: float) -> None:
        self.within = within
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.already = task.cancelling()  # cancellations that are not this timer's
        self.timer = asyncio.get_running_loop().call_later(self.within, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()


class _ArmOnSuspend:
    """Awaits ``awaitable`` exactly as ``await`` would, calling ``arm`` when it first suspends
    (never, if it completes at once): a deadline that costs nothing when no wait comes."""

    __slots__ = ("_arm", "_awaitable")

    def __init__(self, awaitable: Awaitable[bytes], arm: Callable[[], None]) -> None:
        self._awaitable = awaitable
        self._arm = arm

    def __await__(self) -> Generator[Any, Any, bytes]:
        inner = self._awaitable.__await__()
        try:
            suspended_on = inner.send(None)
        except StopIteration as done:
            return cast(bytes, done.value)
        self._arm()
        return cast(bytes, (yield from _rest_of(inner, suspended_on)))


class _Started:
    """The rest of an await whose first step was taken here (it waits on ``waiting_on``)."""

    __slots__ = ("_inner", "_waiting_on")

    def __init__(self, inner: Generator[Any, Any, Message], waiting_on: Any) -> None:
        self._inner = inner
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Message]:
        return cast(Message, (yield from _rest_of(self._inner, self._waiting_on)))


class _Awaiting:
    """An await not begun yet, whose iterator is not a generator (some servers' ``receive``):
    ``await`` takes the iterator as it is."""

    __slots__ = ("_iterator",)

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator

    def __await__(self) -> Generator[Any, Any, Message]:
        return cast(Generator[Any, Any, Message], self._iterator)  # (only iterated)


def _rest_of(inner: Generator[Any, Any, Any], suspended_on: Any) -> Generator[Any, Any, Any]:
    """The rest of an await, step by step, as ``await`` (PEP 380's ``yield from``) does it."""
    while True:
        thrown: BaseException | None = None
        try:
            sent = yield suspended_on
        except GeneratorExit:
            inner.close()
            raise
        except BaseException as exc:
            thrown = exc  # thrown in below, outside this handler, as ``await`` would
        try:
            suspended_on = inner.send(sent) if thrown is None else inner.throw(thrown)
        except StopIteration as done:
            return done.value


async def _read_body(
    receive: Receive, limit: int, first: Message | _Started | _Awaiting | None
) -> bytes:
    """The body from ``first`` on (a message received already, or one on its way)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if first is None:
            message = await receive()
        elif isinstance(first, _Started | _Awaiting):
            message = await first
        else:
            message = first
        first = None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` first, then defers to the server (disconnects)."""
    delivered = False

    async def replaying() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


def parse_json(body: bytes | None) -> Any:
    """The parsed body, or None when absent or not JSON.

    Parsed as the SDK's transports parse it (``pydantic_core.from_json``): what passes here is
    what the app can serialize back. ``json.loads`` would let a lone surrogate (``"\\ud800"``)
    through, which no answer echoing it could then be written with."""
    if not body:
        return None
    try:
        return pydantic_core.from_json(body)
    except (ValueError, RecursionError):  # ValueError: not JSON, or absurdly deep nesting
        return None


def jsonrpc_id(message: Any) -> Any:
    """The JSON-RPC id of a request, echoed in error bodies when it can be read."""
    if isinstance(message, dict):
        request_id = message.get("id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            return request_id
    return None
