"""JSON-RPC 2.0 error responses sent straight to ASGI ``send``.

Every refusal the middleware makes carries a JSON-RPC error body so an MCP client can show the
reason; the HTTP status carries the class of failure (400/401/403/404/413/429/503).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
UNAUTHORIZED = -32001


def error_body(code: int, message: str, *, request_id: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    payload = {"jsonrpc": "2.0", "id": request_id, "error": error}
    return json.dumps(payload, separators=(",", ":")).encode()


async def send_jsonrpc_error(
    send: Send,
    status: int,
    code: int,
    message: str,
    *,
    request_id: Any = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(code, message, request_id=request_id)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
