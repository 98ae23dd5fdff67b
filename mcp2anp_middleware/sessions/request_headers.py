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
    name is not lower-case ASCII."""

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

    session_id: bytes | None
    version: str | None
    origin: str | None
    credential: tuple[bytes, bytes] | None
    accept: str | None
    content_type: str | None
    content_length: bytes | None
    last_event_id: str | None
    session_ids: int
    versions: int
    origins: int
    credentials: int
    names_ok: bool

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.source = headers
        """What was read: a scope whose headers were replaced since is read again."""
        items = headers if isinstance(headers, list | tuple) else list(headers)
        found = dict(items)
        if (
            len(found) == len(items)  # no name came twice, none of those that must come once
            and (found.get(b"authorization") is None or found.get(b"x-api-key") is None)
            and _ascii_names(found)
        ):
            self._from_unique(found)
        else:
            self._scan(items)

    def _from_unique(self, found: dict[bytes, bytes]) -> None:
        """Every name came once (the usual request): read by name, all in C but the lookups."""
        get = found.get
        session_id = get(b"mcp-session-id")
        version = get(b"mcp-protocol-version")
        origin = get(b"origin")
        accept = get(b"accept")
        content_type = get(b"content-type")
        last_event_id = get(b"last-event-id")
        authorization = get(b"authorization")
        self.session_id = session_id
        self.session_ids = 0 if session_id is None else 1
        self.version = None if version is None else version.decode("latin-1")
        self.versions = 0 if version is None else 1
        self.origin = None if origin is None else origin.decode("latin-1")
        self.origins = 0 if origin is None else 1
        if authorization is not None:
            self.credential = (b"authorization", authorization)
        else:
            api_key = get(b"x-api-key")
            self.credential = None if api_key is None else (b"x-api-key", api_key)
        self.credentials = 0 if self.credential is None else 1
        self.accept = None if accept is None else accept.decode("latin-1")
        self.content_type = None if content_type is None else content_type.decode("latin-1")
        self.content_length = get(b"content-length")
        self.last_event_id = None if last_event_id is None else last_event_id.decode("latin-1")
        self.names_ok = True

    def _scan(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Some name came more than once (or is not ASCII): one pass, counting."""
        self.session_id = None
        self.version = None
        self.origin = None
        self.credential = None
        self.accept = None
        self.content_type = None
        self.content_length = None
        self.last_event_id = None
        self.session_ids = self.versions = self.origins = self.credentials = 0
        self.names_ok = True
        kinds = _KINDS
        for name, value in headers:
            kind = kinds.get(name)
            if kind is None:
                if not name.isascii() or name != name.lower():
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


def _ascii_names(found: dict[bytes, bytes]) -> bool:
    """Every name lower-case ASCII, as ASGI servers must give them (the SDK's own header
    handling fails on others)."""
    try:
        names = b"".join(found)
    except TypeError:  # a name that is not bytes: the scan judges it
        return False
    return names.isascii() and names == names.lower()


def request_headers(scope: Scope) -> RequestHeaders:
    """The request's headers as the session middleware read them, or read now (also when an
    app between the two gave the scope other headers)."""
    found = scope.get(HEADERS_SCOPE_KEY)
    headers = scope["headers"]
    if isinstance(found, RequestHeaders) and found.source is headers:
        return found
    return RequestHeaders(headers)
