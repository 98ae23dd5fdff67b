"""Shared pieces of the benchmarks: results, side-by-side timing, in-process ASGI driving.

Every ratio is measured side by side in one process: the two sides run in alternating batches
(A, B, A, B, ...), each round gives one paired ratio, and the reported figure is the median of
those ratios. Absolute times are printed for context only; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

Message = dict[str, Any]


@dataclass
class Result:
    """One row of the results table."""

    name: str
    measured: float
    target: str  # "<= 1.03", ">= 2", or "info"
    detail: str = ""
    unit: str = "x"

    @property
    def status(self) -> str:
        if self.target == "info":
            return "info"
        op, _, bound = self.target.partition(" ")
        limit = float(bound)
        ok = self.measured <= limit if op == "<=" else self.measured >= limit
        return "PASS" if ok else "MISS"


MCP_HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"content-type", b"application/json"),
    (b"accept", b"application/json, text/event-stream"),
]
INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        },
    }
).encode()
"""Raw ASGI headers and body of a complete ``initialize``, shared by the in-process benchmarks."""


def quiet_logs() -> None:
    """Drop the package's structlog events below WARNING, and the libraries' log lines below
    WARNING too (production-like; stdout stays clean). Loggers are cached on first use, as the
    launcher configures them."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("mcp", "example_app", "anp", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.WARNING)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """A compact description of the paired ratios: min / quartiles / max."""
    if len(values) < 4:
        return f"n={len(values)}"
    q = statistics.quantiles(values, n=4)
    return (
        f"n={len(values)} min={min(values):.3f} q1={q[0]:.3f} q3={q[2]:.3f} max={max(values):.3f}"
    )


@dataclass
class Paired:
    """Per-round costs of sides A and B and their per-round ratios B/A."""

    a: list[float]
    b: list[float]

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a, self.b, strict=True)]

    @property
    def ratio(self) -> float:
        return median(self.ratios)


async def paired_async(
    side_a: Callable[[], Awaitable[float]],
    side_b: Callable[[], Awaitable[float]],
    rounds: int,
    warmup: int = 2,
) -> Paired:
    """Run the two measuring coroutines alternately; the first of each pair alternates too."""
    for _ in range(warmup):
        await side_a()
        await side_b()
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(await side_a())
            b.append(await side_b())
        else:
            b.append(await side_b())
            a.append(await side_a())
    return Paired(a, b)


# -- in-process ASGI driving --------------------------------------------------------------------


def http_scope(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def make_receive(body: bytes = b"") -> Callable[[], Awaitable[Message]]:
    """Delivers ``body`` once; afterwards waits forever (the client never disconnects)."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # cancelled by whoever listens for a disconnect
        raise AssertionError("unreachable")

    return receive


async def discard(message: Message) -> None:
    return None


class Capture:
    """A ``send`` that keeps the status and body, to check a request did what it should."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes = b"") -> Capture:
    capture = Capture()
    await app(dict(scope), make_receive(body), capture)
    return capture


async def cost_of(
    app: Any,
    scope: dict[str, Any],
    body: bytes,
    iterations: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per request of ``iterations`` direct ASGI calls, measured with ``clock``."""
    start = clock()
    for _ in range(iterations):
        await app(dict(scope), make_receive(body), discard)
    return (clock() - start) / iterations


# -- running one benchmark module ---------------------------------------------------------------


def run_module(main: Callable[[argparse.Namespace], list[Result]], description: str) -> None:
    """Entry point of a benchmark module: run it, print its rows, write JSON if asked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="write the result rows to this file")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = parser.parse_args()
    quiet_logs()
    results = main(args)
    for row in results:
        print(f"  => {row.name}: {row.measured:.4g}{row.unit} (target {row.target}) {row.status}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(r) for r in results], handle)
    sys.stdout.flush()


def log(text: str) -> None:
    print(text, flush=True)


def jsonrpc_answer(body: bytes | str, content_type: str) -> Any:
    """The JSON-RPC answer in a response body: the JSON body itself, or the response event of
    an SSE stream (MCP's default answer)."""
    text = body.decode() if isinstance(body, bytes) else body
    if not content_type.startswith("text/event-stream"):
        return json.loads(text)
    answer = None
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message = json.loads(line[5:])
            if "result" in message or "error" in message:
                answer = message
    return answer
