"""``python -m example_app.client [URL]``: walk an MCP session's lifecycle against the demo.

Uses the official ``mcp`` client in legacy (handshake) mode, so the ``Mcp-Session-Id`` is visible,
plus a few raw HTTP requests for what the client cannot show (unknown ids, explicit DELETE).
Exit code 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

DEFAULT_URL = "http://127.0.0.1:9880/mcp"
SESSION_HEADER = "mcp-session-id"
PROTOCOL = "2025-11-25"
ACCEPT = {"Accept": "application/json, text/event-stream"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "example_app.client", "version": "1"},
    },
}
LISTING = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
BOGUS_ID = "example-client-bogus-session-id-0000000000"


class StepFailed(Exception):
    """A step did not behave as expected; the message says how."""


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def step(self, ok: bool, name: str, detail: str) -> bool:
        self.failed += not ok
        print(f"{'✓' if ok else '✗'} {name}: {detail}", flush=True)
        return ok


class Wire:
    """httpx2 event hooks recording which session id each request and response carried."""

    def __init__(self) -> None:
        self.created: str | None = None
        self.sent: list[tuple[str, str | None]] = []  # (HTTP method, Mcp-Session-Id)
        self.delete_status: int | None = None

    async def on_request(self, request: httpx2.Request) -> None:
        self.sent.append((request.method, request.headers.get(SESSION_HEADER)))

    async def on_response(self, response: httpx2.Response) -> None:
        if self.created is None and SESSION_HEADER not in response.request.headers:
            self.created = response.headers.get(SESSION_HEADER)
        if response.request.method == "DELETE":
            self.delete_status = response.status_code


def short(session_id: str | None) -> str:
    return f"{session_id[:8]}…" if session_id else "none"


def tool_payload(result: Any, tool: str) -> dict[str, Any]:
    if result.is_error or not isinstance(result.structured_content, dict):
        raise StepFailed(f"{tool} failed: {result.structured_content or result.content}")
    payload: dict[str, Any] = result.structured_content
    return payload


async def browse(client: Client, wire: Wire, report: Report, ad_url: str) -> None:
    """Steps a-e, inside one session of the official client."""
    report.step(bool(wire.created), "session created", f"Mcp-Session-Id {short(wire.created)}")
    tools = {tool.name for tool in (await client.list_tools()).tools}
    missing = {"anp_fetchDoc", "anp_invokeOpenRPC"} - tools
    report.step(not missing, "tools listed", ", ".join(sorted(tools)) or "no tools")
    if missing:
        raise StepFailed(f"missing tools: {', '.join(sorted(missing))}")

    ad = tool_payload(await client.call_tool("anp_fetchDoc", {"url": ad_url}), "anp_fetchDoc")
    interface = next(
        (link for link in ad.get("links", []) if link.get("kind") == "interface"), None
    )
    name = ad.get("document", {}).get("name", "?")
    report.step(interface is not None, "agent description fetched", f"{name!r} from {ad_url}")
    if interface is None:
        raise StepFailed("the agent description links no interface")
    doc = tool_payload(
        await client.call_tool("anp_fetchDoc", {"url": interface["url"]}), "anp_fetchDoc"
    )
    methods = {m["name"]: m for m in doc.get("methods", []) if isinstance(m, dict)}
    report.step(bool(methods), "interface fetched", f"methods {', '.join(methods) or 'none'}")

    chosen = next((m for m in ("echo", "whoami") if m in methods), None)
    if chosen is None:
        raise StepFailed("the interface has neither echo nor whoami")
    params: dict[str, Any] = (
        {"message": "hello from example_app.client"} if chosen == "echo" else {}
    )
    arguments = {"endpoint": methods[chosen]["endpoint"], "method": chosen, "params": params}
    invoked = tool_payload(await client.call_tool("anp_invokeOpenRPC", arguments), chosen)
    report.step("result" in invoked, "method invoked", f"{chosen} → {invoked.get('result')!r}")

    later = wire.sent[1:]
    reused = bool(later) and all(sid == wire.created for _, sid in later)
    seen = sorted({short(sid) for _, sid in later})
    report.step(reused, "session id reused", f"{len(later)} later requests carried {seen}")


async def raw_checks(http: httpx2.AsyncClient, url: str, wire: Wire, report: Report) -> None:
    """Steps f-g: what the server says to unknown, closed and explicitly deleted ids."""
    versioned = {**ACCEPT, "MCP-Protocol-Version": PROTOCOL}

    async def post_listing(session_id: str) -> tuple[int, Any]:
        response = await http.post(
            url, json=LISTING, headers={**versioned, SESSION_HEADER: session_id}
        )
        try:
            error = response.json().get("error")
        except ValueError:
            error = None
        return response.status_code, error

    status, error = await post_listing(BOGUS_ID)
    ok = status == 404 and isinstance(error, dict) and "code" in error
    report.step(ok, "invalid session id rejected", f"HTTP {status}, error {error}")

    if wire.created:
        status, error = await post_listing(wire.created)
        ok = wire.delete_status in (200, 204) and status == 404
        detail = f"client DELETE → {wire.delete_status}, old id then → HTTP {status}"
        report.step(ok, "session closed on client exit", detail)

    created = await http.post(url, json=INIT, headers=ACCEPT)
    session_id = created.headers.get(SESSION_HEADER)
    if created.status_code != 200 or not session_id:
        raise StepFailed(f"raw initialize gave HTTP {created.status_code} and no session id")
    deleted = await http.delete(url, headers={**versioned, SESSION_HEADER: session_id})
    status, _ = await post_listing(session_id)
    ok = deleted.status_code == 204 and status == 404
    detail = f"initialize {short(session_id)} → DELETE {deleted.status_code} → POST {status}"
    report.step(ok, "DELETE closes session", detail)


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def describe(exc: BaseException, url: str) -> str:
    found = leaves(exc)
    for leaf in found:
        if isinstance(leaf, httpx2.TransportError):
            return f"cannot reach {url}: {leaf or type(leaf).__name__}"
    for leaf in found:
        if isinstance(leaf, StepFailed):
            return str(leaf)
        if isinstance(leaf, MCPError):
            return f"MCP error {leaf.code}: {leaf.message}"
    first = found[0]
    return f"unexpected {type(first).__name__}: {first}"


async def run(url: str, api_key: str | None) -> int:
    parts = urlsplit(url)
    ad_url = f"{parts.scheme}://{parts.netloc}/agent/ad.json"
    headers = {"X-API-Key": api_key} if api_key else {}
    timeout = httpx2.Timeout(10, read=30)
    report, wire = Report(), Wire()
    hooks: dict[str, list[Any]] = {"request": [wire.on_request], "response": [wire.on_response]}
    print(f"MCP endpoint {url}, demo agent {ad_url}", flush=True)
    try:
        async with httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks=hooks) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, mode="legacy") as client:
                await browse(client, wire, report, ad_url)
    except Exception as exc:
        report.step(False, "session aborted", describe(exc, url))
        if any(isinstance(leaf, httpx2.TransportError) for leaf in leaves(exc)):
            return fail(report)
    try:
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as raw:
            await raw_checks(raw, url, wire, report)
    except Exception as exc:
        report.step(False, "raw checks aborted", describe(exc, url))
    if report.failed:
        return fail(report)
    print("All steps passed.", flush=True)
    return 0


def fail(report: Report) -> int:
    print(f"FAILED: {report.failed} step(s) did not behave as expected", flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_app.client",
        description="Walk an MCP session's lifecycle against the mcp2anp-middleware demo.",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MCP2ANP_API_KEY"),
        help="sent as X-API-Key (default: env MCP2ANP_API_KEY)",
    )
    args = parser.parse_args(argv)
    if urlsplit(args.url).scheme not in ("http", "https"):
        parser.error(f"not an http(s) URL: {args.url!r}")
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    try:
        return asyncio.run(run(args.url, args.api_key))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
