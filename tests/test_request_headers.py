"""One pass over a request's headers finds what the session layer and the endpoint read."""

from __future__ import annotations

from mcp2anp_middleware.sessions.request_headers import (
    HEADERS_SCOPE_KEY,
    RequestHeaders,
    request_headers,
)


def test_the_first_of_each_and_how_many_came() -> None:
    headers = RequestHeaders(
        [
            (b"host", b"example"),
            (b"accept", b""),  # the first Accept counts, even empty
            (b"accept", b"application/json"),
            (b"mcp-session-id", b"one"),
            (b"mcp-session-id", b"two"),
            (b"mcp-protocol-version", b"2025-11-25"),
            (b"origin", b"http://a"),
            (b"origin", b"http://b"),
            (b"authorization", b"Bearer x"),
            (b"x-api-key", b"k"),
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-type", b"text/plain"),
            (b"content-length", b"12"),
            (b"last-event-id", b"e1"),
            (b"last-event-id", b"e2"),
        ]
    )
    assert headers.accept == ""
    assert (headers.session_id, headers.session_ids) == (b"one", 2)
    assert (headers.version, headers.versions) == ("2025-11-25", 1)
    assert (headers.origin, headers.origins) == ("http://a", 2)
    assert headers.credentials == 2
    assert headers.content_type == "application/json; charset=utf-8"
    assert headers.content_length == b"12"
    assert headers.last_event_id == "e1"
    assert headers.names_ok


def test_nothing_found_and_names_that_are_not_ascii() -> None:
    headers = RequestHeaders([(b"x-caf\xc3\xa9", b"1")])
    assert not headers.names_ok
    assert headers.accept is None and headers.content_type is None
    assert headers.session_id is None and headers.version is None and headers.credential is None
    assert headers.content_length is None and headers.last_event_id is None
    assert headers.session_ids == headers.versions == headers.origins == headers.credentials == 0


def test_the_endpoint_uses_what_the_middleware_read_or_reads_them_itself() -> None:
    headers = [(b"accept", b"text/event-stream")]
    read = RequestHeaders(headers)
    assert request_headers({"headers": headers, HEADERS_SCOPE_KEY: read}) is read
    own = request_headers({"headers": [(b"accept", b"application/json")]})
    assert own.accept == "application/json"
    # an app in between gave the scope other headers: those are read
    other = request_headers(
        {"headers": [(b"accept", b"application/json")], HEADERS_SCOPE_KEY: read}
    )
    assert other.accept == "application/json"
