"""Where the hosting's work is: executed Python lines per unit, by function, stack vs floor.

``python -m bench.lines [--work call:anp_invokeOpenRPC] [--top 40]``

Instruction counts (bench 9) say how much the stack does beyond the floor, not where. This
says where: the floor and the stack (memory store) run the same units as in bench 9 (in process
through ASGI, against the demo agent in a process of its own), and ``sys.settrace`` counts every
Python line each function executes during the measured units. Like instructions, the counts are
the same run after run. A line costs a few hundred instructions on average, so the lines a
function adds are a fair guide to what removing it would save, though the work of one line
varies (a pydantic validation is one line). Builtins and C extensions run no lines: their cost
shows in the line that calls them. The lines of each kind of request (``initialize``,
``notifications/initialized``, ``tools/call``, ``DELETE``) are totalled too. About a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from bench.b9_instructions import ROOT, WORKS, _Client
from bench.common import quiet_logs

Key = tuple[str, str, int]
"""A function: file, name, first line."""


class _LineCounter:
    def __init__(self) -> None:
        self.counts: collections.Counter[Key] = collections.Counter()
        self.by_request: collections.Counter[str] = collections.Counter()
        """Lines while each kind of request was being served (the client says which)."""
        self.request = ""

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._line if event == "call" else None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.by_request[self.request] += 1
            code = frame.f_code
            if code.co_filename == "<string>":  # a dataclass's generated __init__: its class
                owner = type(frame.f_locals.get("self")).__name__
                self.counts[("<string>", f"{owner}.{code.co_name}", 0)] += 1
            else:
                self.counts[(code.co_filename, code.co_name, code.co_firstlineno)] += 1
        return self._line


async def _side(
    side: str, work: str, count: int, settings: Any, did: str
) -> tuple[dict[Key, float], dict[str, float]]:
    from asgi_lifespan import LifespanManager

    from bench.b8_floor import Expect, Floor, stack_app

    expect = Expect(settings.agent_base, did)
    app: Any = Floor(settings) if side == "floor" else stack_app(settings)
    kind, tool = work.split(":")
    counter = _LineCounter()
    async with LifespanManager(app) as manager:
        client = _Client(manager.app, expect, tool)
        await client.open()
        for _ in range(10):
            await client.unit(kind, check=True)
        client.on_request = lambda request: setattr(counter, "request", request)
        sys.settrace(counter.trace)
        try:
            for _ in range(count):
                await client.unit(kind, check=False)
        finally:
            sys.settrace(None)
    per_request = {request: lines / count for request, lines in counter.by_request.items()}
    return {key: lines / count for key, lines in counter.counts.items()}, per_request


_AREAS = (
    ("mcp2anp_middleware/sessions", "ours: sessions"),
    ("mcp2anp_middleware/mcp_hosting", "ours: mcp_hosting"),
    ("mcp2anp_middleware/anp_tools", "ours: anp_tools"),
    ("mcp2anp_middleware", "ours: other"),
    ("/mcp/", "MCP SDK"),
    ("mcp_types", "MCP SDK"),
    ("pydantic", "pydantic"),
    ("anyio", "anyio"),
    ("starlette", "starlette"),
    ("asyncio", "asyncio"),
    ("aiohttp", "aiohttp"),
    ("structlog", "structlog"),
    ("<string>", "dataclass __init__"),
)


def _area(path: str) -> str:
    for fragment, area in _AREAS:
        if fragment in path:
            return area
    return "other"


def _short(path: str) -> str:
    return path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", choices=WORKS, default="call:anp_invokeOpenRPC")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    quiet_logs()
    from bench.b8_floor import Settings, environment, servers

    with environment() as (settings, did, _):
        memory = Settings(**{**settings.__dict__, "redis_url": ""})
        with servers({"agent": ("agent", settings, ROOT)}):
            floor, floor_requests = asyncio.run(_side("floor", args.work, args.count, memory, did))
            stack, stack_requests = asyncio.run(_side("stack", args.work, args.count, memory, did))
    print(f"{args.work}: floor {sum(floor.values()):.0f}, stack {sum(stack.values()):.0f} lines")
    print(f"\n{'request':26} {'floor':>8} {'stack':>8} {'added':>8}")
    for request in dict.fromkeys([*stack_requests, *floor_requests]):
        if not request:
            continue  # (the few lines before the first request)
        low, high = floor_requests.get(request, 0.0), stack_requests.get(request, 0.0)
        print(f"{request:26} {low:8.1f} {high:8.1f} {high - low:+8.1f}")
    by_area: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for column, counts in enumerate((floor, stack)):
        for key, lines in counts.items():
            by_area[_area(key[0])][column] += lines
    print(f"\n{'area':22} {'floor':>8} {'stack':>8} {'added':>8}")
    for area, (low, high) in sorted(by_area.items(), key=lambda item: item[1][0] - item[1][1]):
        print(f"{area:22} {low:8.1f} {high:8.1f} {high - low:+8.1f}")
    print(f"\nfunctions adding the most lines (of {args.count} units, per unit):")
    added = sorted(
        ((stack.get(key, 0.0) - floor.get(key, 0.0), key) for key in stack.keys() | floor.keys()),
        reverse=True,
    )
    for lines, (path, name, first) in added[: args.top]:
        print(f"{lines:7.1f}  {_short(path)}:{first} {name}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
