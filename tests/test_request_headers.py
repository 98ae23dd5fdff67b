"""One pass over a request's headers finds what the session layer and the endpoint read."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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


def test_names_not_in_lower_case_are_not_ok() -> None:
    """ASGI servers must give names in lower case; the SDK's own header handling fails on others
    (a KeyError: a 500), so the middleware refuses them as it refuses names that are not ASCII."""
    for headers in (
        [(b"x-foo", b"1"), (b"X-Bar", b"2")],  # every name once
        [(b"x-foo", b"1"), (b"x-foo", b"2"), (b"X-Bar", b"3")],  # a name twice: the scan
        [(b"Mcp-Session-Id", b"s")],
    ):
        assert not RequestHeaders(headers).names_ok
    assert RequestHeaders([(b"x-foo-1", b"1"), (b"-", b"2")]).names_ok


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


_NAMES = [
    b"host",
    b"accept",
    b"content-type",
    b"content-length",
    b"mcp-session-id",
    b"mcp-protocol-version",
    b"origin",
    b"authorization",
    b"x-api-key",
    b"last-event-id",
    b"x-caf\xc3\xa9",
    b"user-agent",
]


@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.binary(max_size=8)),
        max_size=12,
    )
)
def test_reading_by_name_finds_what_the_counting_pass_finds(
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Names that came once are read by name; the counting pass is the reference."""
    read = RequestHeaders(headers)
    scanned = RequestHeaders.__new__(RequestHeaders)
    scanned._scan(headers)
    for attribute in RequestHeaders.__slots__:
        if attribute != "source":
            assert getattr(read, attribute) == getattr(scanned, attribute), attribute
