"""Keeping libraries' logging from leaking documents, payloads, tokens, key paths and URL secrets.

anp logs whole documents and request details at INFO, some of it straight on the root logger
(``logging.info(...)`` inside ``anp``). httpcore's DEBUG trace logs response headers, which carry
the bearer tokens ANP agents issue. httpx logs every request's whole URL at INFO, query string and
userinfo included. :func:`tame_anp_logging` raises the ``anp`` logger to WARNING, drops INFO/DEBUG
records that anp code emits through the root logger (and cuts URLs in the warnings it lets
through), keeps ``httpcore`` at INFO unless the host configured it explicitly, and attaches the
URL redaction of :mod:`.log_redaction` to the httpx, httpcore, aiohttp, anp and mcp loggers.

It also drops one line of the MCP SDK: ``Terminating session: None``, which
``mcp.server.streamable_http`` logs at INFO at the end of every request when the SDK runs
stateless, as it does under the middleware (see :class:`_DropStatelessTermination`).

The URL redaction is also installed when this module is imported (that is, whenever the package
is), so that a :class:`~mcp2anp_middleware.authenticators.RemoteVerifierAuthenticator` used without
``ANPMiddleware`` cannot log its verifier's query string either; ``tame_anp_logging`` installs it
again to cover loggers created since.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, Final

import anp
import structlog

from mcp2anp_middleware.log_redaction import redact_library_logs, redact_record, redact_urls

_ANP_DIR = os.path.dirname(os.path.abspath(anp.__file__))


class _DropAnpRootChatter(logging.Filter):
    """On the root logger: anp's own INFO/DEBUG records go, its warnings lose URL secrets.

    Records from anp code only (by source path): the host's own root-logger records pass as is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(_ANP_DIR):
            return True
        if record.levelno < logging.WARNING:
            return False
        redact_record(record)
        return True


_FILTER = _DropAnpRootChatter()

SDK_TRANSPORT_LOGGER: Final = "mcp.server.streamable_http"
"""The SDK module whose ``StreamableHTTPServerTransport.terminate`` logs the termination."""
_STATELESS_TERMINATION: Final = "Terminating session: None"


class _DropStatelessTermination(logging.Filter):
    """On :data:`SDK_TRANSPORT_LOGGER`: drops ``Terminating session: None`` at INFO, only that.

    The middleware runs the SDK stateless: every request gets a throwaway transport without a
    session id, which the SDK terminates, and announces at INFO, when the request ends. The line
    carries nothing (the sessions are the middleware's, which logs their end itself) and is the
    most frequent INFO line of a busy server; silencing the whole logger instead would hide its
    warnings too. A termination that names a session, and every other record of the logger,
    still pass. The SDK formats the message itself (an f-string), hence the exact match.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and record.msg == _STATELESS_TERMINATION
            and not record.args
        )


_SDK_FILTER = _DropStatelessTermination()


def tame_anp_logging(level: int = logging.WARNING) -> None:
    """Idempotent; safe to call at import time of a host app."""
    anp_logger = logging.getLogger("anp")
    if anp_logger.level == logging.NOTSET or anp_logger.level < level:
        anp_logger.setLevel(level)
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)
    httpcore = logging.getLogger("httpcore")
    if httpcore.level == logging.NOTSET:
        httpcore.setLevel(logging.INFO)
    transport = logging.getLogger(SDK_TRANSPORT_LOGGER)
    if _SDK_FILTER not in transport.filters:
        transport.addFilter(_SDK_FILTER)
    redact_library_logs()
    _route_anp_root_logging()


class _AnpModuleLogging:
    """Stands in for the ``logging`` module inside anp's modules: their module-level calls
    (``logging.info(...)``) go to the ``anp`` logger instead of the root logger.

    On the root logger, a host logging at INFO paid for a whole record (caller lookup included)
    on every signed request, only for :class:`_DropAnpRootChatter` to drop it. Here the same
    rule holds at no cost: below WARNING nothing is logged, whatever level the ``anp`` logger is
    set to (anp's DEBUG lines include whole signed Authorization headers); warnings and errors
    reach the ``anp`` logger, with the URL redaction attached. Anything else anp reads from
    ``logging`` (``getLogger``, levels) is the real module's.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(logging, name)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        return None

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        return None

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._emit(logging.WARNING, msg, args, kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._emit(logging.ERROR, msg, args, kwargs)

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self._emit(logging.ERROR, msg, args, kwargs)

    def critical(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._emit(logging.CRITICAL, msg, args, kwargs)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        self._emit(level, msg, args, kwargs)

    @staticmethod
    def _emit(level: int, msg: object, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        if level < logging.WARNING or not _ANP_LOGGER.isEnabledFor(level):
            return
        # The record names anp's calling line, not the two frames of this class.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
        _ANP_LOGGER.log(level, msg, *args, **kwargs)


_ANP_LOGGER = logging.getLogger("anp")  # loggers live as long as the process
_ANP_MODULE_LOGGING = _AnpModuleLogging()


def _route_anp_root_logging() -> None:
    """Give every anp module imported so far that logs through the ``logging`` module itself
    the stand-in above (modules imported later still meet the root filter)."""
    for name, module in list(sys.modules.items()):
        if (name == "anp" or name.startswith("anp.")) and getattr(
            module, "logging", None
        ) is logging:
            module.logging = _ANP_MODULE_LOGGING  # type: ignore[attr-defined]


redact_library_logs()


class HotPathLogger:
    """A structlog logger for lines logged on every request or session, bound once per
    configuration.

    ``structlog.get_logger()`` returns a lazy proxy that builds a new bound logger on every
    call, about 6 µs even when the line is filtered out, which is a lot for a line logged per
    request. This binds once and binds again only when the host reconfigures structlog (checked
    through the public ``structlog.get_config()``, well under a microsecond). Under a
    configuration with ``cache_logger_on_first_use`` (the launcher's), the logger bound first is
    kept for good, as structlog keeps its own loggers then, and nothing is checked any more.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._built_for: tuple[object, object, object, object] | None = None
        self._bound: Any = None
        self._is_enabled_for: Any = None
        self._kept: Any = None

    def get(self) -> Any:
        kept = self._kept
        if kept is not None:
            return kept
        config = structlog.get_config()
        built = self._built_for
        if (
            built is None
            or built[0] is not config["wrapper_class"]
            or built[1] is not config["logger_factory"]
            or built[2] is not config["processors"]
            or built[3] is not config["context_class"]
        ):
            self._bound = structlog.get_logger(self._name).bind()
            self._is_enabled_for = getattr(self._bound, "is_enabled_for", None)
            self._built_for = (
                config["wrapper_class"],
                config["logger_factory"],
                config["processors"],
                config["context_class"],
            )
            if config["cache_logger_on_first_use"]:
                self._kept = self._bound
        return self._bound

    def enabled(self, level: int) -> bool:
        """Whether a line at ``level`` would be logged (True when the logger cannot tell), so
        a caller skips building the fields of a line that would be filtered out."""
        self.get()
        check = self._is_enabled_for
        return True if check is None else bool(check(level))

    def __getattr__(self, name: str) -> Any:
        """``logger.info(...)`` and the like, on the logger bound for the configuration."""
        return getattr(self.get(), name)


def exception_fields() -> dict[str, str]:
    """The exception being handled, for a log line of the package's structlog loggers: its
    traceback as plain text (URLs cut), in the ``exception`` field renderers print.

    Not ``exc_info``: structlog's console renderer, with ``rich`` installed, prints each frame's
    local variables, and frames on the way to a failure hold secrets (a credential being
    checked, a session's key). Text formatted here never shows locals, whatever the renderer."""
    return {"exception": traceback_text()}


def traceback_text() -> str:
    """The exception being handled as plain text, URLs cut: for a line of a standard-library
    logger, as a message argument rather than ``exc_info`` (see :func:`exception_fields`)."""
    return redact_urls(traceback.format_exc())
