"""Cutting URLs in library log records down to ``scheme://host[:port]/path``.

The libraries underneath log URLs whole: httpx writes every request's URL at INFO
(``HTTP Request: POST https://verifier/check?token=...``), aiohttp's exceptions carry the URL they
failed on, anp formats URLs into its messages and the MCP SDK logs messages that hold tool
arguments. A query string, fragment or userinfo may carry a secret (a verifier's token, an agent's
signed link), so :class:`URLRedactionFilter` rewrites every URL (``scheme://...``) found in a
record's message, arguments (``str``, ``httpx.URL``, ``yarl.URL``, or anything whose formatted
text shows one) and exception text, keeping only what the documentation promises: host and path.

Limit: a logger's filters run only for records created on that very logger, not for records that
propagate up from its children, so the filter is attached to each logger under
:data:`REDACTED_LOGGERS` that exists when :func:`redact_library_logs` runs (and to the top
loggers, created if missing). A child logger created afterwards (a module imported later) is not
covered until the next call; the package calls it when it is imported and again whenever an
``ANPMiddleware`` is built (through ``tame_anp_logging``). Handlers are left alone: they belong to
the host. Loggers outside these names (the host's own) are never touched.

uvicorn's access log writes each request's path with its query string (``GET /cb?code=...``):
:class:`AccessLogQueryFilter` on ``uvicorn.access`` keeps the path and replaces the query with
``?…``, so a token a client put in a query string (on any route of the host) stays out of it.

A host that formats records with structlog's ``ProcessorFormatter`` should put
:func:`use_redacted_exception_text` in its ``foreign_pre_chain``: that formatter formats
tracebacks afresh from ``exc_info`` and would otherwise undo the redaction of exception text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Final

# aiohttp and httpcore are imported for their module loggers: httpx imports httpcore lazily, on
# its first client, which would create httpcore's loggers after the scan below.
import aiohttp  # noqa: F401
import httpcore  # noqa: F401
import httpx
import yarl

REDACTED_LOGGERS: Final = ("httpx", "httpcore", "aiohttp", "anp", "mcp")
"""Top loggers of the libraries the package drives; their children are covered too."""

# A URL runs until whitespace, a double quote, an angle bracket or a backtick: how it ends inside
# log messages (quotes and brackets it ends with are given back when it is cut).
_URL = re.compile(r"(?i)(?<![a-z0-9+.-])[a-z0-9+.-]*+://[^\s\"<>`]+")
"""Any scheme (or none) before ``://``, taken whole (possessive, and only from the start of a
run of scheme characters: linear in the text, whatever it holds)."""
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_CLOSERS = "'\")]},;"
"""What a URL in a message may be followed by without a space: kept, after the cut URL."""
_AUTHORITY_END = re.compile(r"[/?#]")
_PATH_END = re.compile(r"[?#]")
_FORMATTER = logging.Formatter()


def _shorten(match: re.Match[str]) -> str:
    """``scheme://host[:port]/path`` of one URL: userinfo, query and fragment dropped. A quote
    inside a URL belongs to it (what follows may be a secret); quotes it ends with close it."""
    url = match.group(0)
    bare = url.rstrip(_CLOSERS)
    return _cut(bare) + url[len(bare) :]


def _cut(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url`` (which has a ``://``).

    Done by hand rather than with ``urlsplit``, which raises on some malformed authorities;
    redaction must never fail, whatever the text.
    """
    scheme, _, rest = url.partition("://")
    end = _AUTHORITY_END.search(rest)
    authority, remainder = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
    host = authority.rpartition("@")[2]
    path_end = _PATH_END.search(remainder)
    path = remainder[: path_end.start()] if path_end else remainder
    return f"{scheme}://{host}{path}"


def redact_urls(text: str) -> str:
    """``text`` with every URL in it (``scheme://...``, up to whitespace, a double quote, an
    angle bracket or a backtick) cut to ``scheme://host[:port]/path``."""
    if "://" not in text:  # the common case costs one substring search
        return text
    return _URL.sub(_shorten, text)


def redact_url(value: str) -> str:
    """A URL a client gave, whole, as it may be logged: ``scheme://host[:port]/path`` (the
    rest may carry a secret), or a placeholder for text that is not an absolute URL."""
    words = value.split(None, 1)  # (a secret may follow whitespace too)
    scheme = words[0].partition("://")[0] if words and "://" in words[0] else ""
    if not _SCHEME.fullmatch(scheme):
        return "(not an absolute URL)"
    return _cut(words[0])


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact_urls(value)
    if isinstance(value, httpx.URL | yarl.URL):
        return redact_urls(str(value))
    return value


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite ``record`` in place so that its formatted text shows no query, fragment or userinfo.

    Arguments are redacted one by one, so a message keeps its template (log tools group by it);
    only when the formatted message still shows a URL (one put together from pieces, or inside
    an object's ``str``) is the message replaced by its redacted text. Exception text is
    pre-formatted and redacted only when it needs it, so hosts' formatters are bypassed rarely.
    """
    args = record.args
    if isinstance(args, Mapping):
        record.args = {key: _redact_value(value) for key, value in args.items()}
    elif isinstance(args, tuple):
        record.args = tuple(_redact_value(value) for value in args)
    try:
        message = record.getMessage()
    except Exception:  # the handler will report the bad format; never fail the logging call
        if isinstance(record.msg, str):
            record.msg = redact_urls(record.msg)
    else:
        redacted = redact_urls(message)
        if redacted != message:
            record.msg, record.args = redacted, None
    if record.exc_info and not record.exc_text:
        text = _FORMATTER.formatException(record.exc_info)
        redacted = redact_urls(text)
        if redacted != text:
            record.exc_text = redacted


def use_redacted_exception_text(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: keep the redacted traceback of a stdlib record.

    :func:`redact_record` leaves a redacted copy of a traceback that shows a URL secret in the
    record's ``exc_text``, which the stdlib ``logging.Formatter`` prints instead of formatting
    ``exc_info`` again. structlog's ``ProcessorFormatter`` ignores ``exc_text`` and formats
    ``exc_info`` afresh, secrets included. Put this in its ``foreign_pre_chain`` (after nothing
    that reads ``exc_info``): when the record carries such a text, the event gets it as
    ``exception`` (the key ``format_exc_info`` would use) and loses ``exc_info``.
    """
    record = event_dict.get("_record")
    text = getattr(record, "exc_text", None)
    if isinstance(text, str) and text and "exc_info" in event_dict:
        del event_dict["exc_info"]
        event_dict["exception"] = text
    return event_dict


class URLRedactionFilter(logging.Filter):
    """Logger filter applying :func:`redact_record`; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_FILTER: Final = URLRedactionFilter()


ACCESS_LOGGER: Final = "uvicorn.access"


class AccessLogQueryFilter(logging.Filter):
    """On ``uvicorn.access``: the request target loses its query string (``/cb?…``).

    uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with ``(client, method, target, version,
    status)``; a record of any other shape is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, query, _ = args[2].partition("?")
            if query:
                record.args = (args[0], args[1], path + "?…", *args[3:])
        return True


_ACCESS_FILTER: Final = AccessLogQueryFilter()


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def redact_library_logs(prefixes: Iterable[str] = REDACTED_LOGGERS) -> None:
    """Attach the redaction filter to every logger under ``prefixes`` that exists now.

    Idempotent (one shared filter instance, added once per logger). Placeholder entries (names
    with children but no logger yet) are turned into loggers, so a module that later asks for
    one gets it already filtered.
    """
    prefixes = tuple(prefixes)
    names = {name for name in list(logging.Logger.manager.loggerDict) if _under(name, prefixes)}
    for name in sorted({*prefixes, *names}):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    access = logging.getLogger(ACCESS_LOGGER)
    if _ACCESS_FILTER not in access.filters:
        access.addFilter(_ACCESS_FILTER)
