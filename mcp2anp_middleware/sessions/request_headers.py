"""The request headers MCP serving reads, found in one pass over the request's headers.

The session middleware needs the session id, protocol version, origin and credential (and must
refuse a request that repeats one of them); the MCP endpoint needs ``Accept``,
``Content-Type`` and ``Last-Event-ID``; reading the body needs ``Content-Length``. One pass
finds them all, and the middleware hands the result to the endpoint in the scope
(:data:`HEADERS_SCOPE_KEY`), so a request's headers are walked once, not three times.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Scope

HEADERS_SCOPE_KEY = "mcp2anp.headers"
"""Scope key of the request's :class:`RequestHeaders`, as the session middleware read them."""

_SESSION, _VERSION, _ORIGIN, _CREDENTIAL, _ACCEPT, _TYPE, _LENGTH, _LAST_EVENT = range(8)
_KINDS = {
    b"mcp-session-id": _SESSION,
    b"mcp-protocol-version": _VERSION,
    b"origin": _ORIGIN,
    b"authorization": _CREDENTIAL,
    b"x-api-key": _CREDENTIAL,
    b"accept": _ACCEPT,
    b"content-type": _TYPE,
    b"content-length": _LENGTH,
    b"last-event-id": _LAST_EVENT,
}


class RequestHeaders:
    """The first of each header read here, and how many came of those that must come once.

    Names are matched as ASGI servers give them (lower case); ``names_ok`` is False if any
    name is not ASCII."""

    __slots__ = (
        "accept",
        "content_length",
        "content_type",
        "credential",
        "credentials",
        "last_event_id",
        "names_ok",
        "origin",
        "origins",
        "session_id",
        "session_ids",
        "source",
        "version",
        "versions",
    )

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.source = headers
        """What was read: a scope whose headers were replaced since is read again."""
        self.session_id: bytes | None = None
        self.version: str | None = None
        self.origin: str | None = None
        self.credential: tuple[bytes, bytes] | None = None
        self.accept: str | None = None
        self.content_type: str | None = None
        self.content_length: bytes | None = None
        self.last_event_id: str | None = None
        self.session_ids = self.versions = self.origins = self.credentials = 0
        self.names_ok = True
        kinds = _KINDS
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                if not name.isascii():
                    self.names_ok = False
            elif kind == _SESSION:
                self.session_ids += 1
                if self.session_id is None:
                    self.session_id = value
            elif kind == _VERSION:
                self.versions += 1
                if self.version is None:
                    self.version = value.decode("latin-1")
            elif kind == _ACCEPT:
                if self.accept is None:
                    self.accept = value.decode("latin-1")
            elif kind == _TYPE:
                if self.content_type is None:
                    self.content_type = value.decode("latin-1")
            elif kind == _LENGTH:
                if self.content_length is None:
                    self.content_length = value
            elif kind == _CREDENTIAL:
                self.credentials += 1
                self.credential = (name, value)
            elif kind == _ORIGIN:
                self.origins += 1
                if self.origin is None:
                    self.origin = value.decode("latin-1")
            elif self.last_event_id is None:
                self.last_event_id = value.decode("latin-1")


def request_headers(scope: Scope) -> RequestHeaders:
    """The request's headers as the session middleware read them, or read now (also when an
    app between the two gave the scope other headers)."""
    found = scope.get(HEADERS_SCOPE_KEY)
    headers = scope["headers"]
    if isinstance(found, RequestHeaders) and found.source is headers:
        return found
    return RequestHeaders(headers)
