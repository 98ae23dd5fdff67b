"""Chaining to the server's SIGTERM/SIGINT handlers (``sessions/exit_signals.py``): the
server's handler runs first and unchanged, then the app hears of the stop on its loop; the
handlers go back once nobody listens. The handlers are called directly, as Python would on a
signal: no signal is sent to the test process."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from mcp2anp_middleware.sessions.exit_signals import on_exit_signals

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def kept_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class ServerHandler:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append(signum)


async def _turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_the_servers_handler_runs_then_the_app_hears_on_its_loop() -> None:
    server = ServerHandler()
    signal.signal(signal.SIGTERM, server)
    heard: list[str] = []
    undo = on_exit_signals(lambda: heard.append("stop"))
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler) and handler is not server
    handler(signal.SIGTERM, None)
    assert server.calls == [signal.SIGTERM]
    assert heard == []  # on the loop, not inside the signal handler
    await _turn()
    assert heard == ["stop"]
    undo()
    assert signal.getsignal(signal.SIGTERM) is server


async def test_two_apps_share_one_chain_and_the_last_undo_takes_it_out() -> None:
    server = ServerHandler()
    signal.signal(signal.SIGTERM, server)
    heard: list[str] = []
    undo_one = on_exit_signals(lambda: heard.append("one"))
    chained = signal.getsignal(signal.SIGTERM)
    undo_two = on_exit_signals(lambda: heard.append("two"))
    assert signal.getsignal(signal.SIGTERM) is chained  # not chained twice
    undo_one()
    assert callable(chained)
    chained(signal.SIGTERM, None)
    await _turn()
    assert heard == ["two"] and server.calls == [signal.SIGTERM]
    undo_two()
    assert signal.getsignal(signal.SIGTERM) is server


async def test_default_or_ignored_signals_are_left_alone() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    undo = on_exit_signals(lambda: None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    undo()


async def test_a_handler_replaced_since_is_not_taken_back() -> None:
    signal.signal(signal.SIGTERM, ServerHandler())
    undo = on_exit_signals(lambda: None)
    later = ServerHandler()
    signal.signal(signal.SIGTERM, later)  # someone else's, installed after
    undo()
    assert signal.getsignal(signal.SIGTERM) is later


def test_nothing_is_installed_off_the_main_thread() -> None:
    server = ServerHandler()
    signal.signal(signal.SIGTERM, server)
    undos = []

    def start() -> None:
        async def main() -> None:
            undos.append(on_exit_signals(lambda: None))

        asyncio.run(main())

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is server
    undos[0]()
