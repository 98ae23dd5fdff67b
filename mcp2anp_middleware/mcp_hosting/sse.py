"""Server-sent events on a raw ASGI ``send``: what a response stream of MCP looks like on the wire.

Written here rather than borrowed from a response class because a stream must outlive its
client: when the client goes away (or the server closes the stream for polling), the request goes
on and its later events wait in the event log for a resume, so the writer only has to stop
writing, never to fail.
"""

from __future__ import annotations

from starlette.types import Send

from mcp2anp_middleware.mcp_hosting.backplane import Event

KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps idle streams alive through proxies and load balancers."""

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class SSEWriter:
    """Writes events until the client is gone; ``open`` tells whether writing still reaches it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.open = True
        self.started = False

    async def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        await self._write_raw(None, [*SSE_HEADERS, *headers])

    async def event(self, event: Event, *, retry_ms: int | None = None, last: bool = False) -> None:
        """Write one event; ``last`` ends the response with it (one send fewer than
        :meth:`finish` after it)."""
        lines = []
        if event.event_id is not None:
            lines.append(f"id: {event.event_id}")
        if retry_ms is not None:
            lines.append(f"retry: {retry_ms}")
        if event.payload is None:
            lines.append("data: ")  # a priming event: an id to resume from, nothing to read
        else:
            lines.append("event: message")
            lines.append(f"data: {event.payload}")
        await self._write_raw(("\n".join(lines) + "\n\n").encode(), more=not last)
        if last:
            self.open = False

    async def keepalive(self) -> None:
        await self._write_raw(b": keepalive\n\n")

    async def finish(self) -> None:
        if self.open and self.started:
            await self._write_raw(b"", more=False)
        self.open = False

    async def _write_raw(
        self,
        body: bytes | None,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        more: bool = True,
    ) -> None:
        if not self.open:
            return
        try:
            if headers is not None:
                await self._send({"type": "http.response.start", "status": 200, "headers": headers})
                self.started = True
            else:
                await self._send({"type": "http.response.body", "body": body, "more_body": more})
        except Exception:  # the client is gone (servers differ in how they say so)
            self.open = False
