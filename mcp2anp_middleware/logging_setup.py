"""Keeping libraries' logging from leaking documents, payloads, tokens, key paths and URL secrets.

anp logs whole documents and request details at INFO, some of it straight on the root logger
(``logging.info(...)`` inside ``anp``). httpcore's DEBUG trace logs response headers, which carry
the bearer tokens ANP agents issue. httpx logs every request's whole URL at INFO, query string and
userinfo included. :func:`tame_anp_logging` raises the ``anp`` logger to WARNING, drops INFO/DEBUG
records that anp code emits through the root logger (and cuts URLs in the warnings it lets
through), keeps ``httpcore`` at INFO unless the host configured it explicitly, and attaches the
URL redaction of :mod:`.log_redaction` to the httpx, httpcore, aiohttp, anp and mcp loggers.

The URL redaction is also installed when this module is imported (that is, whenever the package
is), so that a :class:`~mcp2anp_middleware.authenticators.RemoteVerifierAuthenticator` used without
``ANPMiddleware`` cannot log its verifier's query string either; ``tame_anp_logging`` installs it
again to cover loggers created since.
"""

from __future__ import annotations

import logging
import os

import anp

from mcp2anp_middleware.log_redaction import redact_library_logs, redact_record

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
    redact_library_logs()


redact_library_logs()
