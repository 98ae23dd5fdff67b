"""9. Instructions per tool call and per session, whole stack vs the floor, counted by callgrind.

CPU time on a shared 2-core machine moves by 15% between runs of ``b8_floor`` and more between
rounds of one run, which hides any change smaller than that. A count of executed instructions
does not move: valgrind's callgrind counts every instruction the process runs, so the same code
path gives the same count, run after run, to a fraction of a percent. This is the measure to
judge a change by; ``b8_floor`` stays the measure of the issue's targets, since a request that
touches more code also misses the caches more (see docs/performance.md), which a count of
instructions does not see.

Each measurement runs in a process of its own under ``valgrind --tool=callgrind
--instr-atstart=no``: the floor (``b8_floor``'s bare endpoint) or the stack (``ANPMiddleware``
with the memory store, as in ``b8_floor``), called in process through ASGI (no HTTP server:
uvicorn's share would be the same on both sides), against the demo agent in a process of its
own (real signed requests; every result is checked). The child is this file, run as a script
with the measured checkout first on the path, so ``--against`` works with a checkout that has
no ``b9`` of its own (its ``b8_floor`` provides the apps). After a warm-up the child says so, the
parent turns counting on (``callgrind_control -i on``), the child runs the measured units, and
the parent turns counting off before the child exits. The units: ``tools/call`` of each tool on
an open session, and a session's whole life (``initialize``, ``notifications/initialized``, one
``anp_invokeOpenRPC`` call, ``DELETE``). ``--against DIR`` adds the stack of another checkout.

Needs valgrind (Debian: ``apt-get install valgrind``); about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Result, log, quiet_logs, run_module

ROOT = Path(__file__).resolve().parent.parent
WORKS = ("call:anp_fetchDoc", "call:anp_invokeOpenRPC", "churn:anp_invokeOpenRPC")
SESSION = "a session (initialize, initialized, 1 call, DELETE)"


# -- the child: one side, one kind of unit, counted ---------------------------------------------


def _scope(headers: list[tuple[bytes, bytes]], method: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"accept", b"application/json, text/event-stream"),
            (b"content-type", b"application/json"),
            (b"mcp-protocol-version", b"2025-11-25"),
            *headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _exchange(
    app: Any, session_id: str, body: bytes, method: str = "POST"
) -> tuple[dict[str, str], bytes]:
    """One request through ``app``: the response headers and body."""
    headers = [(b"mcp-session-id", session_id.encode())] if session_id else []
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays until the answer is complete
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(headers, method), receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return response_headers, b"".join(m.get("body", b"") for m in sent[1:])


class _Client:
    """A raw MCP client in process (``initialize``, ``initialized``, calls, ``DELETE``).

    Its instructions are counted with the server's, so while counting it does as little as it
    can: its requests are encoded beforehand (a request id may repeat once its request is
    answered), and an answer is only looked at for its result. The warm-up checks every answer
    in full (``check``)."""

    def __init__(self, app: Any, expect: Any, tool: str) -> None:
        from bench.b8_floor import PROTOCOL

        self.on_request: Any = None
        """Called with each request's kind before it is sent (``bench.lines`` splits by it)."""
        self.app = app
        self.expect = expect
        self.tool = tool
        self.session_id = ""
        params = {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        }
        name, arguments = expect.calls[tool]
        self.initialize = _request(1, "initialize", params)
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        self.initialized = json.dumps(initialized).encode()
        self.call_body = _request(2, "tools/call", {"name": name, "arguments": arguments})

    async def open(self) -> None:
        if self.on_request is not None:
            self.on_request("initialize")
        headers, _ = await _exchange(self.app, "", self.initialize)
        self.session_id = headers["mcp-session-id"]
        if self.on_request is not None:
            self.on_request("notifications/initialized")
        await _exchange(self.app, self.session_id, self.initialized)

    async def call(self, check: bool) -> None:
        if self.on_request is not None:
            self.on_request("tools/call")
        headers, body = await _exchange(self.app, self.session_id, self.call_body)
        if check:
            from bench.b8_floor import read_answer

            answer = read_answer(headers.get("content-type", ""), body, 2)
            self.expect.check(self.tool, answer)
        elif b'"result"' not in body:
            raise AssertionError(f"{self.tool} failed: {body[:300]!r}")

    async def close(self) -> None:
        if self.on_request is not None:
            self.on_request("DELETE")
        await _exchange(self.app, self.session_id, b"", method="DELETE")
        self.session_id = ""

    async def unit(self, kind: str, check: bool) -> None:
        """One measured unit: a call on the open session, or (``churn``) a whole session."""
        if kind == "call":
            await self.call(check)
        else:
            await self.open()
            await self.call(check)
            await self.close()


def _request(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return json.dumps(message).encode()


async def _child(side: str, work: str, count: int, settings_json: str, did: str) -> None:
    from asgi_lifespan import LifespanManager

    from bench.b8_floor import Expect, Floor, Settings, stack_app

    settings = Settings(**json.loads(settings_json))
    expect = Expect(settings.agent_base, did)
    app: Any = Floor(settings) if side == "floor" else stack_app(settings)
    kind, tool = work.split(":")
    async with LifespanManager(app) as manager:
        client = _Client(manager.app, expect, tool)
        await client.open()
        for _ in range(max(10, count // 3)):  # warm-up: caches filled, first-use costs paid
            await client.unit(kind, check=True)
        if kind == "churn":
            await client.open()  # the session the measured units' first DELETE ends
            await client.close()
        _say_and_wait("ready")
        for _ in range(count):
            await client.unit(kind, check=False)
        _say_and_wait("done")


def _say_and_wait(word: str) -> None:
    print(word, flush=True)
    sys.stdin.readline()


# -- the parent ---------------------------------------------------------------------------------


def _counted(
    root: Path, side: str, work: str, count: int, settings: Any, did: str, out_dir: Path
) -> int:
    """Instructions the child spent on ``count`` units (counting on only around them)."""
    out = out_dir / f"callgrind.{side}.{work.replace(':', '.')}.{root.name}"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(Path(__file__).resolve()),  # this file, with the checkout's own package and bench
        "--child",
        side,
        "--work",
        work,
        "--count",
        str(count),
        "--settings",
        json.dumps(settings.__dict__),
        "--did",
        did,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        for word, switch in (("ready", "on"), ("done", "off")):
            line = child.stdout.readline().strip()
            if line != word:
                raise RuntimeError(f"{side} {work}: expected {word!r}, child said {line!r}")
            subprocess.run(
                ["callgrind_control", "-i", switch, str(child.pid)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def main(args: argparse.Namespace) -> list[Result]:
    from bench.b8_floor import Settings, environment, servers

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        log("[9] skipped: valgrind is not installed (apt-get install valgrind)")
        return [Result("9. instructions (valgrind not installed)", float("nan"), "info")]
    started = time.perf_counter()
    log("[9] instructions per unit under callgrind, stack / floor (in process, memory store)")
    count = 10 if args.quick else 40
    against: Path | None = _against
    rows: list[Result] = []
    with environment() as (settings, did, _), tempfile.TemporaryDirectory() as tmp:
        memory = Settings(**{**settings.__dict__, "redis_url": ""})
        with servers({"agent": ("agent", settings, ROOT)}):
            for work in WORKS:
                units = count if work.startswith("call") else max(5, count // 2)
                floor = _counted(ROOT, "floor", work, units, memory, did, Path(tmp)) / units
                sides = [("stack", ROOT, "")]
                if against is not None:
                    sides.append(("stack", against, ", --against checkout"))
                kind, tool = work.split(":")
                what = tool if kind == "call" else SESSION
                for side, root, label in sides:
                    stack = _counted(root, side, work, units, memory, did, Path(tmp)) / units
                    detail = f"stack {stack:,.0f} vs floor {floor:,.0f} instructions per unit"
                    log(f"  {what}{label}: {stack / floor:.3f}x ({detail})")
                    rows.append(
                        Result(
                            f"9. {what} instructions, stack / floor{label}",
                            stack / floor,
                            "info",
                            detail,
                        )
                    )
    log(f"  ({time.perf_counter() - started:.1f} s)")
    return rows


_against: Path | None = None


def entry() -> None:
    """``--child`` (a counted process) and ``--against DIR`` are this module's own; anything
    else is the common benchmark entry point (``--quick``, ``--json``)."""
    global _against
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--child", choices=("floor", "stack"))
    parser.add_argument("--work", choices=WORKS)
    parser.add_argument("--count", type=int)
    parser.add_argument("--settings")
    parser.add_argument("--did")
    parser.add_argument("--against", type=Path)
    known, rest = parser.parse_known_args()
    if known.against is not None:
        _against = known.against.resolve()
    if known.child:
        quiet_logs()
        asyncio.run(_child(known.child, known.work, known.count, known.settings, known.did))
    else:
        sys.argv = [sys.argv[0], *rest]
        run_module(main, __doc__ or "")


if __name__ == "__main__":
    entry()
